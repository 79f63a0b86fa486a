"""Test data, written straight to the database."""

from __future__ import annotations

import itertools

from app.extensions import db
from app.models import Campaign, Customer

_numbers = itertools.count(1)


def make_customer(**fields) -> Customer:
    n = next(_numbers)
    values = {
        "phone": f"+2547{n:08d}",
        "first_name": f"First{n}",
        "last_name": f"Last{n}",
        "location": "Nairobi",
        "preferred_product": f"Product{n}",
        "country": "KE",
        **fields,
    }
    customer = Customer(**values)
    db.session.add(customer)
    db.session.commit()
    return customer


def make_customers(count: int, **fields) -> list[int]:
    return [make_customer(**fields).id for _ in range(count)]


def make_campaign(**fields) -> Campaign:
    values = {
        "name": "Spring sale",
        "channel": "sms",
        "status": "draft",
        "base_template": "Hi {first_name}, check out {preferred_product}",
        **fields,
    }
    campaign = Campaign(**values)
    db.session.add(campaign)
    db.session.commit()
    return campaign


def bulk_customers(count: int, **fields) -> list[int]:
    """`count` customers like `make_customer`'s, written in one statement (for tests that need thousands)."""
    first = next(_numbers)
    for _ in range(count - 1):
        next(_numbers)
    rows = [
        {
            "phone": f"+2547{n:08d}",
            "first_name": f"First{n}",
            "last_name": f"Last{n}",
            "location": "Nairobi",
            "preferred_product": f"Product{n}",
            "country": "KE",
            **fields,
        }
        for n in range(first, first + count)
    ]
    ids = db.session.scalars(db.insert(Customer).returning(Customer.id), rows).all()
    db.session.commit()
    return sorted(ids)
