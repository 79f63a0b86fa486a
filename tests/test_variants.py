"""A/B variants: each recipient gets one, chosen from the campaign and the customer alone (the same in SQL and
in Python, whenever they are added), in proportion to the weights; the message is rendered from it; the
stats, listing, export, estimate and preview show each variant."""

from __future__ import annotations

import csv
import io
from collections import Counter
from decimal import Decimal

from sqlalchemy import select

from app.extensions import db
from app.messaging import variants
from app.models import OutboundMessage
from tests.factories import bulk_customers, make_campaign, make_customer
from tests.helpers import stats

TWO = [
    {"name": "short", "base_template": "Hi {first_name}: 20% off", "whatsapp_template": None, "weight": 1},
    {
        "name": "long",
        "base_template": "Hello {first_name}, 20% off everything today",
        "whatsapp_template": None,
        "weight": 3,
    },
]


def variant_campaign(**fields):
    return make_campaign(name="ab", base_template="Hi {first_name}", variants=TWO, **fields)


def send(client, campaign_id: int, customer_ids: list[int]) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": customer_ids})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def stored_variants(campaign_id: int) -> dict[int, str]:
    db.session.rollback()
    rows = db.session.execute(
        select(OutboundMessage.customer_id, OutboundMessage.variant).where(OutboundMessage.campaign_id == campaign_id)
    )
    return dict(rows.all())


def test_each_customer_gets_the_variant_the_campaign_and_customer_choose_in_proportion_to_the_weights(
    app, client, work
):
    ids = bulk_customers(10_000)
    campaign = variant_campaign()
    # Added in two sends, the second repeating half of the first: each customer keeps what they got.
    send(client, campaign.id, ids[:6000])
    send(client, campaign.id, ids[3000:])
    chosen = stored_variants(campaign.id)
    assert len(chosen) == 10_000
    assert all(chosen[i] == variants.choose(TWO, campaign.id, i) for i in ids)  # SQL and Python agree
    shares = Counter(chosen.values())
    assert abs(shares["long"] / 10_000 - 0.75) < 0.02 and abs(shares["short"] / 10_000 - 0.25) < 0.02
    # Another campaign draws again (not the same split of customers), as deterministically.
    other = variant_campaign()
    send(client, other.id, ids[:2000])
    again = stored_variants(other.id)
    assert all(again[i] == variants.choose(TWO, other.id, i) for i in ids[:2000])
    assert sum(again[i] != chosen[i] for i in ids[:2000]) > 200


def test_a_message_is_rendered_from_its_variant_and_the_stats_listing_and_export_show_it(
    app, client, use_provider, fake_providers, work
):
    use_provider("twilio")
    app.config["SMS_SEGMENT_PRICE"] = Decimal("0.5")
    customers = [make_customer(first_name=f"C{n}") for n in range(12)]
    campaign = variant_campaign()
    send(client, campaign.id, [c.id for c in customers])
    work()
    chosen = stored_variants(campaign.id)
    bodies = {r.params["To"]: r.params["Body"] for r in fake_providers.requests("twilio")}
    for customer in customers:
        template = variants.named(TWO, chosen[customer.id])["base_template"]
        assert bodies[customer.phone] == template.replace("{first_name}", customer.first_name)

    # A failed message sent again keeps its variant.
    long_ones = [c for c in customers if chosen[c.id] == "long"]
    message_id = next(r.message_id for r in fake_providers.requests("twilio") if r.params["To"] == long_ones[0].phone)
    assert fake_providers.send_receipt("twilio", message_id, "undelivered", error_code="30003").status == 200
    assert client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()["requeued"] == 1
    work()
    assert stored_variants(campaign.id) == chosen

    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    counts = Counter(chosen.values())
    assert detail["stats"] == stats(total=12, sent=12, variants=detail["stats"]["variants"])
    assert set(detail["stats"]["variants"]) == set(counts)
    for name, shown in detail["stats"]["variants"].items():
        assert (shown["total"], shown["sent"], shown["segments_sent"]) == (counts[name], counts[name], counts[name])
        assert shown["cost"] == str(Decimal("0.5") * counts[name])
    listed = client.get(f"/campaigns/{campaign.id}/messages?page_size=100").get_json()["data"]
    assert {m["customer_id"]: m["variant"] for m in listed} == chosen
    rows = list(
        csv.DictReader(io.StringIO(client.get(f"/campaigns/{campaign.id}/messages.csv").get_data(as_text=True)))
    )
    assert {int(row["customer_id"]): row["variant"] for row in rows} == chosen


def test_the_api_checks_variants_and_the_estimate_and_preview_show_each(app, client):
    base = {"name": "ab", "channel": "sms", "base_template": "Hi {first_name}"}

    def create(found):
        return client.post("/campaigns", json={**base, "variants": found})

    one = [{"name": "a", "base_template": "x"}]
    bad = [
        (one, "variants"),
        (one * 6, "variants"),
        ([{"name": "a", "base_template": "x"}, {"name": "a", "base_template": "y"}], "variants.1.name"),
        ([{"name": "a b", "base_template": "x"}, {"name": "b", "base_template": "y"}], "variants.0.name"),
        ([{"name": "a", "base_template": "x", "weight": 0}, {"name": "b", "base_template": "y"}], "variants.0.weight"),
        (
            [{"name": "a", "base_template": "x"}, {"name": "b", "base_template": "Hi {nickname}"}],
            "variants.1.base_template",
        ),
        (
            [
                {"name": "a", "base_template": "x", "whatsapp_template": {"name": "t", "language": "en"}},
                {"name": "b", "base_template": "y"},
            ],
            "variants.0.whatsapp_template",
        ),
    ]
    for found, named in bad:
        response = create(found)
        assert response.status_code == 422, found
        assert named in response.get_json()["errors"], (found, response.get_json())

    response = create(
        [{"name": "plain", "base_template": "Hi {first_name}"}, {"name": "fancy", "base_template": "Hi {first_name} ’"}]
    )
    assert response.status_code == 201, response.get_json()
    campaign = response.get_json()
    assert [v["weight"] for v in campaign["variants"]] == [1, 1]
    app.config["SMS_SEGMENT_PRICE"] = Decimal("1")
    ids = [make_customer(first_name="Amina").id for _ in range(40)]
    estimate = client.post(f"/campaigns/{campaign['id']}/estimate", json={"customer_ids": ids}).get_json()
    by_name = {v["name"]: v for v in estimate["variants"]}
    chosen = Counter(variants.choose(campaign["variants"], campaign["id"], i) for i in ids)
    assert {name: v["recipients"] for name, v in by_name.items()} == {
        "plain": chosen["plain"],
        "fancy": chosen["fancy"],
    }
    assert by_name["fancy"]["by_encoding"]["UCS-2"]["messages"] == chosen["fancy"]  # its ’ makes it UCS-2
    assert by_name["plain"]["by_encoding"]["GSM-7"]["messages"] == chosen["plain"]
    assert (estimate["recipients"], estimate["segments"], estimate["cost"]) == (40, 40, "40")

    preview = client.post(f"/campaigns/{campaign['id']}/personalized-preview", json={"customer_id": ids[0]}).get_json()
    assert preview["variant"] == variants.choose(campaign["variants"], campaign["id"], ids[0])
    shown = {v["name"]: v["rendered_message"] for v in preview["variants"]}
    assert shown == {"plain": "Hi Amina", "fancy": "Hi Amina ’"}
    assert preview["rendered_message"] == shown[preview["variant"]]
    assert {v["name"]: v["encoding"] for v in preview["variants"]} == {"plain": "GSM-7", "fancy": "UCS-2"}
