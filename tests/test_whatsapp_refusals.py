"""WhatsApp's own refusals, acted on, end to end against the local WhatsApp fake (a real HTTP server posting
signed statuses to the served app): 131050 (the user stopped marketing messages) opts the customer out of
WhatsApp, whether the send's answer or a failed status says it; 131049 (Meta held a marketing message back)
holds the message 24 hours and tries it once more, then fails it for good."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.extensions import db
from app.messaging.reconcile import reconcile
from app.models import CustomerOptOut
from tests.factories import make_campaign, make_customer
from tests.fake_providers import accept, refuse
from tests.helpers import stats


def send(client, campaign_id: int, customer_ids: list[int]) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": customer_ids})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def detail(client, campaign_id: int) -> dict:
    db.session.rollback()  # what the served app committed (receipts come through it), not what this session read
    return client.get(f"/campaigns/{campaign_id}").get_json()


def message_of(client, campaign_id: int) -> dict:
    db.session.rollback()
    [message] = client.get(f"/campaigns/{campaign_id}/messages").get_json()["data"]
    return message


def opt_outs(customer_id: int) -> dict[str, str]:
    db.session.expire_all()
    rows = db.session.scalars(select(CustomerOptOut).where(CustomerOptOut.customer_id == customer_id))
    return {row.channel: row.source for row in rows}


def whatsapp_campaign(name: str = "promo"):
    return make_campaign(name=name, channel="whatsapp", base_template="Hi {first_name}")


def test_131050_in_the_send_answer_opts_the_customer_out_of_whatsapp(app, client, use_provider, fake_providers, work):
    use_provider("whatsapp_cloud")
    stopped, fine = make_customer(), make_customer()
    fake_providers.script("whatsapp", stopped.phone.removeprefix("+"), refuse(131050))
    campaign = whatsapp_campaign()
    send(client, campaign.id, [stopped.id, fine.id])
    work()
    assert opt_outs(stopped.id) == {"whatsapp": "provider"} and opt_outs(fine.id) == {}
    later = whatsapp_campaign("later")
    assert send(client, later.id, [stopped.id, fine.id])["skipped_opted_out"] == 1


def test_131050_in_a_failed_status_opts_the_customer_out_and_other_codes_do_not(
    app, client, use_provider, fake_providers, work
):
    use_provider("whatsapp_cloud")
    stopped, undeliverable = make_customer(), make_customer()
    campaign = whatsapp_campaign()
    send(client, campaign.id, [stopped.id, undeliverable.id])
    work()
    by_phone = {r.params["to"]: r.message_id for r in fake_providers.requests("whatsapp")}
    answer = fake_providers.send_receipts(
        "whatsapp",
        [
            (by_phone[stopped.phone.removeprefix("+")], "failed", [131050]),
            (by_phone[undeliverable.phone.removeprefix("+")], "failed", [131026]),
        ],
    )
    assert answer.status == 200
    assert opt_outs(stopped.id) == {"whatsapp": "provider"}
    assert opt_outs(undeliverable.id) == {}  # undeliverable is not a wish: no opt-out
    assert detail(client, campaign.id)["stats"] == stats(total=2, failed=2)
    # Meta posts a status again when it is not sure we took it: the repeat changes nothing.
    assert fake_providers.send_receipt("whatsapp", by_phone[stopped.phone.removeprefix("+")], "failed", errors=[131050])
    assert opt_outs(stopped.id) == {"whatsapp": "provider"}


def test_131049_holds_the_message_24_hours_then_sends_it_once_more(
    app, client, use_provider, fake_providers, work, clock
):
    use_provider("whatsapp_cloud")
    customer = make_customer()
    campaign = whatsapp_campaign()
    send(client, campaign.id, [customer.id])
    work()
    assert detail(client, campaign.id)["status"] == "sent"
    [first] = fake_providers.requests("whatsapp")

    assert fake_providers.send_receipt("whatsapp", first.message_id, "failed", errors=[131049]).status == 200
    held = message_of(client, campaign.id)
    assert held["status"] == "pending" and held["provider_message_id"] is None
    assert held["provider_held_at"] is not None and "131049" in held["last_error"]
    assert held["not_before"] == (clock.now() + timedelta(hours=24)).isoformat()
    shown = detail(client, campaign.id)
    assert shown["status"] == "sending"  # it has a message to send again: not finished
    assert shown["stats"] == stats(total=1, pending=1, held_by_provider=1)

    # Not before its time, whatever passes meanwhile.
    clock.advance(hours=23, minutes=59)
    reconcile()
    work()
    assert len(fake_providers.requests("whatsapp")) == 1

    clock.advance(minutes=2)
    reconcile()
    work()
    second = fake_providers.requests("whatsapp")[-1]
    assert len(fake_providers.requests("whatsapp")) == 2 and second.message_id != first.message_id
    assert detail(client, campaign.id)["status"] == "sent"
    # A late repeat of the first status finds nothing to hold again.
    fake_providers.send_receipt("whatsapp", first.message_id, "failed", errors=[131049])
    assert message_of(client, campaign.id)["status"] == "sent"

    # Held back again: it fails for good, and retry-failed leaves it alone.
    assert fake_providers.send_receipt("whatsapp", second.message_id, "failed", errors=[131049]).status == 200
    failed = message_of(client, campaign.id)
    assert (failed["status"], failed["error_code"], failed["error_class"]) == ("failed", "131049", "permanent")
    assert detail(client, campaign.id)["stats"] == stats(total=1, failed=1)
    retried = client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()
    assert (retried["requeued"], retried["not_retryable"]) == (0, 1)


def test_a_held_message_of_a_paused_campaign_waits_for_the_resume(
    app, client, use_provider, fake_providers, work, clock
):
    use_provider("whatsapp_cloud")
    customers = [make_customer(), make_customer()]
    fake_providers.script("whatsapp", customers[1].phone.removeprefix("+"), accept())
    campaign = whatsapp_campaign()
    send(client, campaign.id, [c.id for c in customers])
    work()
    [first, _] = fake_providers.requests("whatsapp")
    fake_providers.send_receipt("whatsapp", first.message_id, "failed", errors=[131049])
    assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
    clock.advance(hours=25)
    reconcile()
    work()
    assert len(fake_providers.requests("whatsapp")) == 2  # paused: nothing goes
    assert client.post(f"/campaigns/{campaign.id}/resume").status_code == 200
    work()
    assert len(fake_providers.requests("whatsapp")) == 3
    assert detail(client, campaign.id)["status"] == "sent"
