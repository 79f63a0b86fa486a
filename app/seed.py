"""Sample data: a few customers and campaigns to try the service with (`flask seed`, `flask up`)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from app import clock
from app.extensions import db
from app.models import Campaign, Customer

SAMPLE_CUSTOMERS = [
    {
        "phone": "+254712345678",
        "first_name": "Amina",
        "last_name": "Otieno",
        "location": "Nairobi",
        "preferred_product": "Sneakers",
    },
    {
        "phone": "+254722000111",
        "first_name": "Brian",
        "last_name": "Kamau",
        "location": "Mombasa",
        "preferred_product": "Headphones",
    },
    {
        "phone": "+254733000222",
        "first_name": "Cynthia",
        "last_name": None,
        "location": "Nairobi",
        "preferred_product": "Handbags",
    },
    {
        "phone": "+254744000333",
        "first_name": "",
        "last_name": "Mwangi",
        "location": "Kisumu",
        "preferred_product": "Smartwatch",
    },
    {
        "phone": "+254755000444",
        "first_name": "Esther",
        "last_name": "Njeri",
        "location": None,
        "preferred_product": None,
    },
]


def seed_sample_data() -> tuple[int, int]:
    """Add the sample customers and campaigns that are not there yet; returns how many of each."""
    known = set(db.session.scalars(select(Customer.phone)))
    customers = [Customer(**c) for c in SAMPLE_CUSTOMERS if c["phone"] not in known]
    campaigns = []
    if not db.session.scalar(select(func.count()).select_from(Campaign)):
        campaigns = [
            Campaign(
                name="Welcome",
                channel="sms",
                status="draft",
                base_template="Hi {first_name}, welcome! Check out {preferred_product}.",
            ),
            Campaign(
                name="Nairobi flash sale",
                channel="whatsapp",
                status="draft",
                base_template="Hello {first_name} {last_name}, 20% off {preferred_product} in {location} today.",
            ),
            Campaign(
                name="Weekend reminder",
                channel="sms",
                status="scheduled",
                scheduled_at=clock.now() + timedelta(days=2),
                base_template="Hi {first_name}, your {preferred_product} deal ends Sunday.",
            ),
        ]
    db.session.add_all(customers + campaigns)
    db.session.commit()
    if campaigns:
        from app.messaging.triggers import sync_dispatch

        sync_dispatch(campaigns[2].id, campaigns[2].scheduled_at)
    return len(customers), len(campaigns)
