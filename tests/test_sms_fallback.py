"""SMS fallback of a WhatsApp campaign, end to end against the local WhatsApp and Twilio fakes (real HTTP servers
posting signed statuses to the served app): each trigger (undeliverable, window_closed, not_delivered), the
consent rules (an SMS opt-out, WhatsApp's 131050, the frequency cap), a delivered status racing the fallback,
pause and cancel with fallbacks waiting, a Redis flush with fallbacks due, and a campaign of 2,000 recipients
half of whom fall back, counted at the fakes."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest
from sqlalchemy import select

from app import metrics
from app.customers import optouts
from app.extensions import db
from app.messaging.reconcile import reconcile
from app.models import Customer
from config import frequency_cap
from tests.factories import bulk_customers, make_campaign, make_customer
from tests.fake_providers import refuse
from tests.helpers import stats

SMS_BODY = "Hi {first_name}, your offer: https://shop.example/deal"


def fallback_campaign(on: list[str], within: str = "2h", **fields):
    spec = {"base_template": "SMS for {first_name|you}: 20% off today", "on": on, "not_delivered_within": within}
    return make_campaign(name="promo", channel="whatsapp", base_template="Hi {first_name}", sms_fallback=spec, **fields)


def send(client, campaign_id: int, customer_ids: list[int]) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": customer_ids})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def detail(client, campaign_id: int) -> dict:
    db.session.rollback()  # what the served app committed, not what this session read
    return client.get(f"/campaigns/{campaign_id}").get_json()


def messages(client, campaign_id: int) -> list[dict]:
    db.session.rollback()
    return client.get(f"/campaigns/{campaign_id}/messages?page_size=100").get_json()["data"]


def number(customer) -> str:
    return customer.phone.removeprefix("+")


def whatsapp_ids(fake_providers) -> dict[str, str]:
    """The WhatsApp fake's message id of each number it took a message for."""
    return {r.params["to"]: r.message_id for r in fake_providers.requests("whatsapp")}


def sms_to(fake_providers) -> list[str]:
    return [r.params["To"] for r in fake_providers.requests("twilio")]


@pytest.fixture
def providers(use_provider):
    use_provider("twilio")
    use_provider("whatsapp_cloud")


def test_undeliverable_at_the_send_falls_back_to_one_sms(app, client, providers, fake_providers, work, clock):
    unreachable, reachable = make_customer(first_name="Amina"), make_customer()
    fake_providers.script("whatsapp", number(unreachable), refuse(131026))
    campaign = fallback_campaign(["undeliverable"])
    send(client, campaign.id, [unreachable.id, reachable.id])
    work()

    assert sms_to(fake_providers) == [unreachable.phone]
    [sms] = fake_providers.requests("twilio")
    assert sms.params["Body"] == "SMS for Amina: 20% off today"
    by_channel = {(m["channel"], m["customer_id"]): m for m in messages(client, campaign.id)}
    whatsapp = by_channel[("whatsapp", unreachable.id)]
    fallback = by_channel[("sms", unreachable.id)]
    assert (whatsapp["status"], whatsapp["error_code"]) == ("failed", "131026")
    assert (fallback["status"], fallback["fallback_for"], fallback["provider"]) == ("sent", whatsapp["id"], "twilio")
    assert by_channel[("whatsapp", reachable.id)]["fallback_for"] is None
    shown = detail(client, campaign.id)
    assert shown["stats"] == stats(total=2, sent=1, failed=1, fallback_total=1, fallback_sent=1)
    # A late failure of the message WhatsApp took could still trigger one: not finished until its window passes.
    assert shown["status"] == "sending"
    clock.advance(hours=2, minutes=1)
    reconcile()
    assert detail(client, campaign.id)["status"] == "sent"


def test_window_closed_in_a_failed_status_falls_back_once_however_often_it_comes(
    app, client, providers, fake_providers, work
):
    customer = make_customer()
    campaign = fallback_campaign(["window_closed"])
    send(client, campaign.id, [customer.id])
    work()
    message_id = whatsapp_ids(fake_providers)[number(customer)]
    for _ in range(2):  # Meta posts a status again when it is not sure it was taken
        assert fake_providers.send_receipt("whatsapp", message_id, "failed", errors=[131047]).status == 200
    work()
    assert sms_to(fake_providers) == [customer.phone]
    assert detail(client, campaign.id)["stats"] == stats(total=1, failed=1, fallback_total=1, fallback_sent=1)
    assert detail(client, campaign.id)["status"] == "sent"


def test_a_trigger_the_campaign_does_not_name_sends_nothing(app, client, providers, fake_providers, work, clock):
    customer = make_customer()
    fake_providers.script("whatsapp", number(customer), refuse(131026))
    campaign = fallback_campaign(["window_closed"])
    send(client, campaign.id, [customer.id])
    work()
    assert sms_to(fake_providers) == []
    assert detail(client, campaign.id)["stats"] == stats(total=1, failed=1)
    assert detail(client, campaign.id)["status"] == "failed"  # no message went


def test_not_delivered_within_its_window_falls_back_and_a_late_delivery_is_counted(
    app, client, providers, fake_providers, work, clock
):
    delivered, silent = make_customer(), make_customer()
    campaign = fallback_campaign(["not_delivered"], within="15m")
    send(client, campaign.id, [delivered.id, silent.id])
    work()
    ids = whatsapp_ids(fake_providers)
    assert fake_providers.send_receipt("whatsapp", ids[number(delivered)], "delivered").status == 200

    clock.advance(minutes=14)
    reconcile()
    work()
    assert sms_to(fake_providers) == [] and detail(client, campaign.id)["status"] == "sending"

    clock.advance(minutes=2)
    reconcile()
    work()
    assert sms_to(fake_providers) == [silent.phone]
    shown = detail(client, campaign.id)
    assert shown["status"] == "sent"
    assert shown["stats"] == stats(total=2, sent=1, delivered=1, fallback_total=1, fallback_sent=1)

    # WhatsApp delivered it after all: recorded, and counted as what the fallback cost twice.
    assert fake_providers.send_receipt("whatsapp", ids[number(silent)], "delivered").status == 200
    assert detail(client, campaign.id)["stats"] == stats(
        total=2, delivered=2, fallback_total=1, fallback_sent=1, delivered_after_fallback=1
    )
    reconcile()
    work()
    assert sms_to(fake_providers) == [silent.phone]  # nothing more


def test_a_message_meta_held_back_counts_its_window_from_its_next_send(
    app, client, providers, fake_providers, work, clock
):
    customer = make_customer()
    campaign = fallback_campaign(["not_delivered"], within="1h")
    send(client, campaign.id, [customer.id])
    work()
    first = whatsapp_ids(fake_providers)[number(customer)]
    assert fake_providers.send_receipt("whatsapp", first, "failed", errors=[131049]).status == 200  # held 24 h
    clock.advance(hours=24, minutes=1)
    reconcile()
    work()
    assert len(fake_providers.requests("whatsapp")) == 2  # sent again...
    reconcile()
    work()
    assert sms_to(fake_providers) == []  # ...and its hour starts now, not a day ago
    clock.advance(hours=1, minutes=1)
    reconcile()
    work()
    assert sms_to(fake_providers) == [customer.phone]


def test_a_delivery_before_the_fallback_goes_cancels_it(app, client, providers, fake_providers, work, clock):
    customer = make_customer()
    campaign = fallback_campaign(["not_delivered"], within="30s")
    send(client, campaign.id, [customer.id])
    work()
    clock.advance(seconds=31)
    reconcile()  # the fallback is made and queued...
    [_, fallback] = sorted(messages(client, campaign.id), key=lambda m: m["id"])
    assert (fallback["channel"], fallback["status"]) == ("sms", "queued")
    # ...and the WhatsApp message is delivered before a worker sends it.
    message_id = whatsapp_ids(fake_providers)[number(customer)]
    assert fake_providers.send_receipt("whatsapp", message_id, "delivered").status == 200
    work()
    assert sms_to(fake_providers) == []
    [_, fallback] = sorted(messages(client, campaign.id), key=lambda m: m["id"])
    assert (fallback["status"], fallback["error_code"]) == ("canceled", "delivered_first")
    shown = detail(client, campaign.id)
    assert shown["stats"] == stats(total=1, delivered=1, fallback_total=1, fallback_canceled=1)
    assert shown["status"] == "sent"


def test_consent_an_sms_opt_out_a_whatsapp_stop_and_the_frequency_cap(
    app, client, providers, fake_providers, work, clock
):
    app.config["FREQUENCY_CAP"] = frequency_cap("2/7d")
    no_sms, stopped, capped, fine = (make_customer() for _ in range(4))
    optouts.opt_out_ids([no_sms.id], "sms", "api")
    db.session.commit()
    # `capped` had two messages this week from another campaign; its own WhatsApp message does not count.
    earlier = make_campaign(name="earlier", channel="sms", base_template="Hello")
    send(client, earlier.id, [capped.id])
    work()
    later = make_campaign(name="later", channel="sms", base_template="Hello again", ignore_frequency_cap=True)
    send(client, later.id, [capped.id])
    work()
    fake_providers.clear()
    for customer in (no_sms, capped, fine):
        fake_providers.script("whatsapp", number(customer), refuse(131026))
    fake_providers.script("whatsapp", number(stopped), refuse(131050))

    campaign = fallback_campaign(["undeliverable", "not_delivered"], ignore_frequency_cap=False)
    answer = send(client, campaign.id, [no_sms.id, stopped.id, capped.id, fine.id])
    assert answer["skipped_frequency_cap"] == 1  # capped: no WhatsApp either
    work()
    assert sms_to(fake_providers) == [fine.phone]
    clock.advance(hours=3)
    reconcile()
    work()
    assert sms_to(fake_providers) == [fine.phone]  # 131050 is a wish for less marketing, never a fallback
    assert detail(client, campaign.id)["stats"] == stats(
        total=3, failed=3, fallback_total=2, fallback_sent=1, fallback_skipped_opted_out=1
    )
    assert metrics.flush(app)
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'dispatch_sms_fallbacks_total{result="made"} 1.0' in scrape
    assert 'dispatch_sms_fallbacks_total{result="skipped_opted_out"} 1.0' in scrape


def test_the_fallback_skips_a_customer_the_cap_holds_back_but_not_for_its_own_message(
    app, client, providers, fake_providers, work
):
    app.config["FREQUENCY_CAP"] = frequency_cap("1/7d")
    capped, fine = make_customer(), make_customer()
    campaign = fallback_campaign(["window_closed"])
    send(client, campaign.id, [capped.id, fine.id])
    work()
    other = make_campaign(name="other", channel="sms", base_template="Hello", ignore_frequency_cap=True)
    send(client, other.id, [capped.id])
    work()
    ids = whatsapp_ids(fake_providers)
    for customer in (capped, fine):
        fake_providers.send_receipt("whatsapp", ids[number(customer)], "failed", errors=[131047])
    work()
    assert sms_to(fake_providers) == [capped.phone, fine.phone]  # `other`'s SMS, then the one fallback
    assert detail(client, campaign.id)["stats"] == stats(
        total=2, failed=2, fallback_total=2, fallback_sent=1, fallback_skipped_frequency_cap=1
    )


def test_pause_holds_fallbacks_resume_sends_them_and_cancel_cancels_them(
    app, client, providers, fake_providers, work, clock
):
    first, second = make_customer(), make_customer()
    campaign = fallback_campaign(["not_delivered"], within="1m")
    send(client, campaign.id, [first.id, second.id])
    work()
    assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
    clock.advance(minutes=2)
    reconcile()
    work()
    assert sms_to(fake_providers) == []  # made, but paused: nothing goes
    assert detail(client, campaign.id)["stats"]["fallback_pending"] == 2
    assert client.post(f"/campaigns/{campaign.id}/resume").status_code == 200
    work()
    assert sorted(sms_to(fake_providers)) == sorted([first.phone, second.phone])
    assert detail(client, campaign.id)["status"] == "sent"

    third = make_customer()
    other = fallback_campaign(["not_delivered"], within="1m")
    send(client, other.id, [third.id])
    work()
    clock.advance(minutes=2)
    reconcile()
    assert client.post(f"/campaigns/{other.id}/cancel").status_code == 200
    work()
    assert third.phone not in sms_to(fake_providers)
    assert detail(client, other.id)["stats"] == stats(total=1, sent=1, fallback_total=1, fallback_canceled=1)


def test_fallbacks_due_survive_a_redis_flush(app, client, providers, fake_providers, work, clock, redis_conn):
    customers = [make_customer() for _ in range(3)]
    campaign = fallback_campaign(["not_delivered"], within="10m")
    send(client, campaign.id, [c.id for c in customers])
    work()
    clock.advance(minutes=11)
    reconcile()  # made and queued...
    redis_conn.flushdb()  # ...and every job and scheduled check lost
    clock.advance(minutes=6)  # past STALE_AFTER: the reconciler takes the queued ones back
    reconcile()
    work()
    assert sorted(sms_to(fake_providers)) == sorted(c.phone for c in customers)
    assert detail(client, campaign.id)["status"] == "sent"


def test_the_reconciler_makes_a_fallback_whose_trigger_was_lost(
    app, client, providers, fake_providers, work, monkeypatch
):
    customer = make_customer()
    fake_providers.script("whatsapp", number(customer), refuse(131026))
    campaign = fallback_campaign(["undeliverable"])
    # The worker dies between the failure's record and its fallback: here, the fallback is never made.
    monkeypatch.setattr("app.messaging.fallback.trigger", lambda message_id, reason: False)
    send(client, campaign.id, [customer.id])
    work()
    assert sms_to(fake_providers) == [] and detail(client, campaign.id)["status"] == "sending"
    monkeypatch.undo()
    reconcile()
    work()
    assert sms_to(fake_providers) == [customer.phone]
    assert detail(client, campaign.id)["status"] == "sent"
    reconcile()
    work()
    assert sms_to(fake_providers) == [customer.phone]  # made once


def test_retry_failed_sends_a_failed_fallback_again_but_not_the_whatsapp_message_it_replaced(
    app, client, providers, fake_providers, work, clock
):
    customer = make_customer()
    campaign = fallback_campaign(["not_delivered"], within="1m")
    send(client, campaign.id, [customer.id])
    work()
    # WhatsApp fails it with a transient code (retry-failed would send it again), and the window passes.
    whatsapp_id = whatsapp_ids(fake_providers)[number(customer)]
    assert fake_providers.send_receipt("whatsapp", whatsapp_id, "failed", errors=[131000]).status == 200
    clock.advance(minutes=2)
    reconcile()
    work()
    [sms] = fake_providers.requests("twilio")
    assert fake_providers.send_receipt("twilio", sms.message_id, "undelivered", error_code="30003").status == 200
    assert detail(client, campaign.id)["stats"] == stats(total=1, failed=1, fallback_total=1, fallback_undelivered=1)
    retried = client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()
    assert retried["requeued"] == 1  # the SMS only: the customer was reached by SMS, not WhatsApp again
    work()
    assert len(fake_providers.requests("whatsapp")) == 1 and sms_to(fake_providers) == [customer.phone] * 2


def test_the_api_checks_the_fallback_and_the_estimate_and_preview_show_it(app, client):
    base = {"name": "promo", "channel": "whatsapp", "base_template": "Hi {first_name}"}

    def create(**fields):
        return client.post("/campaigns", json={**base, **fields})

    bad = [
        ({"channel": "sms", "sms_fallback": {"base_template": "x", "on": ["undeliverable"]}}, "sms_fallback"),
        ({"sms_fallback": {"base_template": "Hi {nickname}", "on": ["undeliverable"]}}, "sms_fallback.base_template"),
        ({"sms_fallback": {"base_template": "x" * 1601, "on": ["undeliverable"]}}, "sms_fallback.base_template"),
        ({"sms_fallback": {"base_template": "x", "on": []}}, "sms_fallback.on"),
        ({"sms_fallback": {"base_template": "x", "on": ["bounced"]}}, "sms_fallback.on.0"),
        (
            {"sms_fallback": {"base_template": "x", "on": ["not_delivered"], "not_delivered_within": "2 weeks"}},
            "sms_fallback.not_delivered_within",
        ),
        (
            {"sms_fallback": {"base_template": "x", "on": ["not_delivered"], "not_delivered_within": "8d"}},
            "sms_fallback.not_delivered_within",
        ),
    ]
    for fields, named in bad:
        response = create(**fields)
        assert response.status_code == 422, fields
        assert named in response.get_json()["errors"], (fields, response.get_json())

    response = create(
        sms_fallback={"base_template": "Hi {first_name}, 20% off: https://shop.example/d", "on": ["undeliverable"]}
    )
    assert response.status_code == 201, response.get_json()
    campaign = response.get_json()
    assert campaign["sms_fallback"] == {
        "base_template": "Hi {first_name}, 20% off: https://shop.example/d",
        "on": ["undeliverable"],
        "not_delivered_within": "2h",
    }
    assert campaign["sms_fallback_encoding"]["encoding"] == "GSM-7" and "template_encoding" not in campaign
    app.config["SMS_SEGMENT_PRICE"] = Decimal("0.8")
    app.config["CURRENCY"] = "KES"
    customers = [make_customer(first_name="Amina"), make_customer(first_name="Łukasz"), make_customer()]
    optouts.opt_out_ids([customers[2].id], "sms", "api")
    db.session.commit()
    estimate = client.post(
        f"/campaigns/{campaign['id']}/estimate", json={"customer_ids": [c.id for c in customers]}
    ).get_json()
    assert estimate["recipients"] == 3 and estimate["segments"] is None
    worst = estimate["fallback"]
    assert (worst["recipients"], worst["skipped_opted_out"], worst["too_long"]) == (2, 1, 0)
    assert worst["by_encoding"] == {"GSM-7": {"messages": 1, "segments": 1}, "UCS-2": {"messages": 1, "segments": 1}}
    assert (worst["segments"], worst["cost"], worst["currency"]) == (2, "1.6", "KES")

    preview = client.post(
        f"/campaigns/{campaign['id']}/personalized-preview", json={"customer_id": customers[0].id}
    ).get_json()
    assert preview["rendered_message"] == "Hi Amina"
    assert preview["fallback"]["rendered_message"].startswith("Hi Amina, 20% off: http")
    assert preview["fallback"]["links"] == ["https://shop.example/d"]
    assert (preview["fallback"]["encoding"], preview["fallback"]["segments"]) == ("GSM-7", 1)


@pytest.mark.real_only
def test_2000_recipients_half_of_whom_fall_back_get_one_whatsapp_and_at_most_one_sms_each(
    app, client, providers, fake_providers, spawn_worker, clock
):
    ids = bulk_customers(2000)
    phones = dict(db.session.execute(select(Customer.id, Customer.phone).where(Customer.id.in_(ids))).all())
    unreachable = set(ids[::2])
    for customer_id in unreachable:
        fake_providers.script("whatsapp", phones[customer_id].removeprefix("+"), refuse(131026))
    campaign = fallback_campaign(["undeliverable", "not_delivered"], within="1h")
    send(client, campaign.id, ids)
    drain(app, spawn_worker)
    whatsapp = Counter("+" + r.params["to"] for r in fake_providers.requests("whatsapp"))
    assert len(whatsapp) == 2000 and set(whatsapp.values()) == {1}
    assert Counter(sms_to(fake_providers)) == Counter(phones[i] for i in unreachable)
    shown = detail(client, campaign.id)
    assert shown["stats"] == stats(total=2000, sent=1000, failed=1000, fallback_total=1000, fallback_sent=1000)
    assert shown["status"] == "sending"  # the others may still not be delivered within the hour

    # WhatsApp delivers the others, a hundred statuses a post; the window passes, and nothing more goes.
    taken = [r.message_id for r in fake_providers.requests("whatsapp") if r.message_id]
    for start in range(0, len(taken), 100):
        statuses = [(message_id, "delivered") for message_id in taken[start : start + 100]]
        assert fake_providers.send_receipts("whatsapp", statuses).status == 200
    clock.advance(hours=2)  # the workers' clock is the real one: well past their sends' window
    reconcile()
    drain(app, spawn_worker)
    whatsapp = Counter("+" + r.params["to"] for r in fake_providers.requests("whatsapp"))
    sms = Counter(sms_to(fake_providers))
    assert len(whatsapp) == 2000 and set(whatsapp.values()) == {1}
    assert set(sms) == {phones[i] for i in unreachable} and set(sms.values()) == {1}
    shown = detail(client, campaign.id)
    assert shown["stats"] == stats(total=2000, delivered=1000, failed=1000, fallback_total=1000, fallback_sent=1000)
    assert shown["status"] == "sent"


def drain(app, spawn_worker, processes: int = 2) -> None:
    """Run burst worker processes, with the app's provider settings, until every queue is empty."""
    settings = {
        name: str(value)
        for name, value in app.config.items()
        if value is not None
        and (name.startswith(("TWILIO_", "WHATSAPP_")) or name in ("SMS_PROVIDER", "PUBLIC_BASE_URL", "WEBHOOK_TOKEN"))
    }
    workers = [spawn_worker(**settings) for _ in range(processes)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read().decode()[-3000:]
    db.session.rollback()
