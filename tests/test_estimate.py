"""SMS encoding and segments through the API: the preview, the template's warning, the segments a sent
message stores and the stats sum, and the cost estimate of a send."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.models import IdempotencyKey, OutboundMessage
from tests.factories import make_campaign, make_customer, make_customers

UCS_TEMPLATE = "Hi {first_name}, it’s {preferred_product} time"


def preview(client, campaign_id, customer_id):
    response = client.post(f"/campaigns/{campaign_id}/personalized-preview", json={"customer_id": customer_id})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def estimate(client, campaign_id, body, status=200):
    response = client.post(f"/campaigns/{campaign_id}/estimate", json=body)
    assert response.status_code == status, response.get_json()
    return response.get_json()


# --- the preview ---


def test_preview_of_an_sms_counts_the_rendered_message(client):
    amina = make_customer(first_name="Amina", preferred_product="Viatu 😀")
    campaign = make_campaign(base_template=UCS_TEMPLATE)
    answer = preview(client, campaign.id, amina.id)
    assert answer["rendered_message"] == "Hi Amina, it’s Viatu 😀 time"
    assert answer["encoding"] == "UCS-2"
    assert answer["characters"] == 27 and answer["units"] == 28 and answer["segments"] == 1
    assert answer["non_gsm_characters"] == ["’", "😀"]


def test_preview_of_a_long_gsm_message_counts_its_segments(client):
    customer = make_customer(first_name="A" * 100, preferred_product="B" * 100)
    campaign = make_campaign(base_template="{first_name} {preferred_product} [sale]")
    answer = preview(client, campaign.id, customer.id)
    assert (answer["encoding"], answer["characters"], answer["units"]) == ("GSM-7", 208, 210)
    assert answer["segments"] == 2 and answer["non_gsm_characters"] == []


def test_preview_of_a_whatsapp_message_has_no_sms_fields(client):
    customer = make_customer(first_name="Amina")
    campaign = make_campaign(channel="whatsapp", base_template="Hi {first_name} 😀")
    assert preview(client, campaign.id, customer.id) == {
        "campaign_id": campaign.id,
        "customer_id": customer.id,
        "rendered_message": "Hi Amina 😀",
        "links": [],
    }


# --- the template's fixed text, on create and edit ---


def test_creating_an_sms_campaign_warns_of_a_ucs2_template_without_refusing_it(client):
    response = client.post("/campaigns", json={"name": "Promo", "channel": "sms", "base_template": UCS_TEMPLATE})
    assert response.status_code == 201
    encoding = response.get_json()["template_encoding"]
    # The placeholders are removed: the fixed text is "Hi , it’s  time".
    assert encoding["encoding"] == "UCS-2" and encoding["non_gsm_characters"] == ["’"]
    assert encoding["characters"] == len("Hi , it’s  time") and encoding["segments"] == 1
    assert "’ is not in the GSM-7 alphabet" in encoding["warning"]


def test_a_gsm_template_has_no_warning_and_editing_it_answers_the_new_one(client):
    response = client.post(
        "/campaigns", json={"name": "Promo", "channel": "sms", "base_template": "Hi {first_name}, {location}"}
    )
    assert response.status_code == 201
    encoding = response.get_json()["template_encoding"]
    assert encoding == {
        "encoding": "GSM-7",
        "characters": len("Hi , "),
        "units": len("Hi , "),
        "segments": 1,
        "non_gsm_characters": [],
        "warning": None,
    }
    campaign_id = response.get_json()["id"]
    edited = client.patch(f"/campaigns/{campaign_id}", json={"base_template": "Sale {first_name}! " + "x" * 200})
    assert edited.status_code == 200
    encoding = edited.get_json()["template_encoding"]
    assert encoding["encoding"] == "GSM-7" and encoding["segments"] == 2
    assert encoding["warning"] == "the fixed text alone takes 2 SMS segments per message"
    assert client.get(f"/campaigns/{campaign_id}").get_json()["template_encoding"] == encoding


def test_a_whatsapp_campaign_answers_no_template_encoding(client):
    response = client.post("/campaigns", json={"name": "W", "channel": "whatsapp", "base_template": UCS_TEMPLATE})
    assert response.status_code == 201
    assert "template_encoding" not in response.get_json()


# --- segments stored by the send job, summed by the stats ---


def test_a_sent_sms_stores_its_segments_and_stats_sum_the_accepted_ones(client, app, work):
    short = make_customer(preferred_product="Shoes")
    long = make_customer(preferred_product="A" * 158)
    emoji = make_customer(preferred_product="😀" * 40)
    campaign = make_campaign(base_template="Hi {preferred_product}")
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [short.id, long.id, emoji.id]})
    assert response.status_code == 202
    work()
    stored = dict(db.session.execute(select(OutboundMessage.customer_id, OutboundMessage.segments)).all())
    assert stored == {short.id: 1, long.id: 2, emoji.id: 2}  # 161 septets; 83 UTF-16 units
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["stats"]["sent"] == 3 and detail["stats"]["segments_sent"] == 5


def test_failed_messages_keep_their_segments_but_are_not_in_segments_sent(client, app, work):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 99
    ids = make_customers(2)
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids}).status_code == 202
    work()
    assert db.session.scalars(select(OutboundMessage.segments)).all() == [1, 1]  # rendered, then refused
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["stats"]["failed"] == 2 and detail["stats"]["segments_sent"] == 0


def test_a_whatsapp_message_stores_no_segments(client, work):
    ids = make_customers(2)
    campaign = make_campaign(channel="whatsapp")
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids}).status_code == 202
    work()
    rows = db.session.execute(select(OutboundMessage.status, OutboundMessage.segments)).all()
    assert [tuple(r) for r in rows] == [("sent", None), ("sent", None)]
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["segments_sent"] == 0


# --- the estimate ---


def _stored_and_queued(redis_conn) -> tuple:
    rows = db.session.scalar(select(func.count()).select_from(OutboundMessage))
    keys = db.session.scalar(select(func.count()).select_from(IdempotencyKey))
    db.session.rollback()
    return rows, keys, sorted(redis_conn.keys("rq:*"))


def test_estimate_for_ids_splits_by_encoding_and_stores_and_queues_nothing(client, redis_conn):
    plain = make_customer(first_name="Amina", preferred_product="Shoes")
    curly = make_customer(first_name="Zoë’s", preferred_product="Shoes")
    long = make_customer(first_name="Amina", preferred_product="S" * 200)
    campaign = make_campaign(base_template="Hi {first_name}, check out {preferred_product}")
    before = _stored_and_queued(redis_conn)
    answer = estimate(client, campaign.id, {"customer_ids": [plain.id, curly.id, long.id]})
    assert answer == {
        "campaign_id": campaign.id,
        "channel": "sms",
        "recipients": 3,
        "skipped_opted_out": 0,
        "skipped_frequency_cap": 0,
        "segments": 1 + 1 + 2,
        "by_encoding": {"GSM-7": {"messages": 2, "segments": 3}, "UCS-2": {"messages": 1, "segments": 1}},
        "too_long": 0,
        "cost": None,
        "currency": None,
        "fallback": None,
    }
    assert _stored_and_queued(redis_conn) == before
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "draft"


def test_estimate_for_an_audience_with_cost_and_currency(client, app):
    app.config["SMS_SEGMENT_PRICE"] = Decimal("0.8")
    app.config["CURRENCY"] = "KES"
    make_customers(3, location="Nairobi", first_name="Amina")
    make_customers(2, location="Mombasa", first_name="Juma")
    campaign = make_campaign(base_template="Hi {first_name} from {location}")
    answer = estimate(client, campaign.id, {"audience": {"location": "Nairobi"}})
    assert (answer["recipients"], answer["segments"], answer["cost"], answer["currency"]) == (3, 3, "2.4", "KES")
    everyone = estimate(client, campaign.id, {"audience": {"all": True}})
    assert (everyone["recipients"], everyone["segments"], everyone["cost"]) == (5, 5, "4.0")
    assert everyone["by_encoding"] == {"GSM-7": {"messages": 5, "segments": 5}, "UCS-2": {"messages": 0, "segments": 0}}


def test_estimate_leaves_out_customers_already_messaged_and_counts_too_long_ones(client):
    ids = make_customers(3)
    make_customer(preferred_product="x" * 200)
    campaign = make_campaign(base_template="{preferred_product}" * 9)  # 1,800 characters for `huge`
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids[:1]}).status_code == 202
    answer = estimate(client, campaign.id, {"audience": {"all": True}})
    assert answer["recipients"] == 3 and answer["too_long"] == 1
    assert answer["by_encoding"]["GSM-7"]["messages"] == 2


def test_estimate_of_a_whatsapp_campaign_counts_recipients_only(client, app):
    app.config["SMS_SEGMENT_PRICE"] = Decimal("0.8")
    app.config["CURRENCY"] = "KES"
    make_customers(2)
    campaign = make_campaign(channel="whatsapp", base_template="Hi {first_name} 😀")
    answer = estimate(client, campaign.id, {"audience": {"all": True}})
    assert answer["recipients"] == 2 and answer["skipped_opted_out"] == 0
    assert answer["segments"] is None and answer["by_encoding"] is None
    assert answer["cost"] is None and answer["currency"] is None


def test_estimate_leaves_out_opted_out_customers_as_the_send_does(client):
    keep = make_customer(first_name="Keep")
    out = make_customer(first_name="Out")
    assert client.post(f"/customers/{out.id}/opt-out", json={"channel": "sms"}).status_code == 200
    campaign = make_campaign()
    answer = estimate(client, campaign.id, {"audience": {"all": True}})
    assert (answer["recipients"], answer["skipped_opted_out"], answer["segments"]) == (1, 1, 1)
    answer = estimate(client, campaign.id, {"customer_ids": [keep.id]})
    assert (answer["recipients"], answer["skipped_opted_out"]) == (1, 0)
    # The send applies the same filter: it creates the one message the estimate counted.
    assert client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}}).status_code == 202
    assert db.session.scalars(select(OutboundMessage.customer_id)).all() == [keep.id]


def test_estimate_errors_are_those_of_send(client):
    customer = make_customer()
    campaign = make_campaign()
    assert estimate(client, 999, {"customer_ids": [customer.id]}, status=404)["message"] == "campaign 999 not found"
    missing = estimate(client, campaign.id, {"customer_ids": [customer.id, 998]}, status=422)
    assert "no customer with id 998" in missing["message"]
    for body in (
        {},
        {"customer_ids": []},
        {"audience": {"all": False}},
        {"customer_ids": [1], "audience": {"all": True}},
    ):
        estimate(client, campaign.id, body, status=422)
    canceled = make_campaign(status="canceled")
    conflict = estimate(client, canceled.id, {"customer_ids": [customer.id]}, status=409)
    assert "canceled" in conflict["message"]


def test_estimate_of_an_audience_matching_no_one_is_zero(client):
    campaign = make_campaign()
    answer = estimate(client, campaign.id, {"audience": {"location": "Nowhere"}})
    assert (answer["recipients"], answer["segments"]) == (0, 0)


@pytest.mark.parametrize("template", ["Hi {preferred_product}", "Hi {preferred_product} ’"])
def test_estimate_agrees_with_the_segments_the_send_job_stores(client, work, template):
    make_customer(preferred_product="A" * 160)
    make_customer(preferred_product="B")
    campaign = make_campaign(base_template=template)
    answer = estimate(client, campaign.id, {"audience": {"all": True}})
    assert client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}}).status_code == 202
    work()
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["segments_sent"] == answer["segments"]
