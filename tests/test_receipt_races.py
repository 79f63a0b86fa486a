"""A receipt is applied or kept, never neither: not when it races the send's record, not when thousands of
receipts that will never match are kept beside it; and kept ones that never match age out."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, insert, select, text

from app import metrics
from app.extensions import db
from app.messaging import receipts
from app.messaging.reconcile import reconcile
from app.models import DeliveryReceipt, MessageStatus, OutboundMessage
from tests.factories import bulk_customers, make_campaign, make_customers

pytestmark = pytest.mark.real_only


def sent_message(client, provider: str = "twilio", provider_message_id: str | None = None) -> OutboundMessage:
    """A message of a sending campaign, recorded `sent` with `provider_message_id` (None: not recorded yet)."""
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": make_customers(1)})
    assert response.status_code == 202
    message = db.session.scalars(select(OutboundMessage).where(OutboundMessage.campaign_id == campaign.id)).one()
    if provider_message_id is not None:
        db.session.execute(
            text(
                "UPDATE outbound_messages SET status = 'sent', provider = :p, provider_message_id = :i WHERE id = :id"
            ),
            {"p": provider, "i": provider_message_id, "id": message.id},
        )
        db.session.commit()
    return message


def status_of(message_id: int) -> str:
    db.session.rollback()
    return db.session.get(OutboundMessage, message_id).status


def test_a_receipt_whose_message_is_recorded_while_it_looks_is_applied(app, client):
    """The send's record commits between the receipt's update (which found no message with its id) and its
    look for the message (which finds it): the receipt must not be answered "unchanged" and dropped."""
    message = sent_message(client)
    recorder = db.engine.connect()  # the send job's record, in flight: the provider id is written, not committed
    recorder.execute(
        text(
            "UPDATE outbound_messages SET status = 'sent', provider = 'twilio', provider_message_id = 'SM-race' "
            "WHERE id = :id"
        ),
        {"id": message.id},
    )
    committed = []

    def commit_the_record_after_the_receipts_update(conn, cursor, statement, parameters, context, executemany):
        if not committed and "UPDATE outbound_messages" in statement and conn is not recorder:
            recorder.commit()  # lands right after the receipt's update, before anything else it runs
            committed.append(statement)

    event.listen(db.engine, "after_cursor_execute", commit_the_record_after_the_receipts_update)
    try:
        answer = receipts.record([receipts.Receipt("twilio", "SM-race", MessageStatus.DELIVERED)])
    finally:
        event.remove(db.engine, "after_cursor_execute", commit_the_record_after_the_receipts_update)
        recorder.close()
    assert committed, "the race was not staged"
    assert answer["unchanged"] == 0  # it did not change the message: it found none, and was kept
    assert status_of(message.id) == MessageStatus.DELIVERED  # then applied once its own commit was done
    assert db.session.scalar(select(DeliveryReceipt.id)) is None


def test_kept_receipts_that_never_match_do_not_hold_up_those_that_do(app, client):
    """10,002 kept WhatsApp statuses of another system's messages, then 240 receipts of this service's own
    messages recorded after their receipts came: one reconciler pass applies all 240."""
    db.session.execute(
        insert(DeliveryReceipt),
        [
            {"provider": "whatsapp_cloud", "provider_message_id": f"wamid.other-{n}", "status": "delivered"}
            for n in range(10_002)
        ],
    )
    db.session.commit()
    # One campaign sent to 240 customers: 240 messages of this service's own.
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": bulk_customers(240)})
    assert response.status_code == 202
    own = list(
        db.session.scalars(
            select(OutboundMessage.id).where(OutboundMessage.campaign_id == campaign.id).order_by(OutboundMessage.id)
        )
    )
    assert len(own) == 240
    for n in range(240):
        assert receipts.record([receipts.Receipt("whatsapp_cloud", f"wamid.own-{n}", MessageStatus.DELIVERED)]) == {
            "applied": 0,
            "unchanged": 0,
            "kept": 1,
        }
    # Their messages are recorded later (a send job that recorded during an outage, say).
    for n, message_id in enumerate(own):
        db.session.execute(
            text(
                "UPDATE outbound_messages SET status = 'sent', provider = 'whatsapp_cloud', "
                "provider_message_id = :i WHERE id = :id"
            ),
            {"i": f"wamid.own-{n}", "id": message_id},
        )
    db.session.commit()
    assert reconcile().applied_receipts == 240
    assert {status_of(message_id) for message_id in own} == {MessageStatus.DELIVERED}
    assert db.session.scalar(select(db.func.count()).select_from(DeliveryReceipt)) == 10_002


def test_kept_receipts_that_never_match_age_out_and_are_counted(app, client, clock):
    receipts.record([receipts.Receipt("twilio", "SM-stray", MessageStatus.DELIVERED)])
    clock.advance(seconds=app.config["KEPT_RECEIPT_TTL"] - 60)
    assert reconcile().expired_receipts == 0
    clock.advance(seconds=120)
    assert reconcile().expired_receipts == 1
    assert db.session.scalar(select(DeliveryReceipt.id)) is None
    assert metrics.flush(app)
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'dispatch_receipts_expired_total{provider="twilio"} 1.0' in scrape


def test_a_read_receipt_before_its_delivery_moves_the_message_once(app, client):
    message = sent_message(client, "whatsapp_cloud", "wamid.read")
    assert (
        receipts.record([receipts.Receipt("whatsapp_cloud", "wamid.read", MessageStatus.DELIVERED, read=True)])[
            "applied"
        ]
        == 1
    )
    db.session.rollback()
    row = db.session.get(OutboundMessage, message.id)
    assert row.status == MessageStatus.DELIVERED and row.read_at is not None
    read_at = row.read_at
    # The delivery receipt after it, and the read one again: nothing moves.
    assert (
        receipts.record([receipts.Receipt("whatsapp_cloud", "wamid.read", MessageStatus.DELIVERED)])["unchanged"] == 1
    )
    assert (
        receipts.record([receipts.Receipt("whatsapp_cloud", "wamid.read", MessageStatus.DELIVERED, read=True)])[
            "unchanged"
        ]
        == 1
    )
    db.session.rollback()
    assert db.session.get(OutboundMessage, message.id).read_at == read_at
    assert timedelta(0) <= read_at - message.created_at
