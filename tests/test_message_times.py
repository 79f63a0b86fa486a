"""When a message was sent and delivered: recorded by the send and its receipts, listed, and summed up in
the campaign's stats as the median and 95th percentile of seconds from sent to delivered."""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.messaging.lifecycle import apply_receipt
from app.models import OutboundMessage
from tests.factories import make_campaign, make_customers


def deliver(message: OutboundMessage, read: bool = False) -> None:
    assert apply_receipt(message.provider, message.provider_message_id, "delivered", read=read)
    db.session.commit()


def test_sent_at_and_delivered_at_are_recorded_and_listed(client, work, clock):
    ids = make_customers(2)
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids}).status_code == 202
    work()
    sent_at = clock.now()
    messages = db.session.scalars(select(OutboundMessage).order_by(OutboundMessage.id)).all()
    assert [m.sent_at for m in messages] == [sent_at, sent_at]
    assert [m.delivered_at for m in messages] == [None, None]
    clock.advance(seconds=4)
    deliver(messages[0])
    clock.advance(seconds=10)
    deliver(messages[0], read=True)  # a later read receipt keeps the first delivery time
    listed = client.get(f"/campaigns/{campaign.id}/messages").get_json()["data"]
    by_id = {m["id"]: m for m in listed}
    first = by_id[messages[0].id]
    assert first["sent_at"] == sent_at.isoformat()
    assert first["delivered_at"] == "2030-01-01T12:00:04+00:00"
    assert first["read_at"] == "2030-01-01T12:00:14+00:00"
    assert by_id[messages[1].id]["delivered_at"] is None


def test_delivery_seconds_of_an_unknown_campaign_is_404(client):
    assert client.get("/campaigns/999/delivery-seconds").status_code == 404


def test_stats_give_the_median_and_95th_percentile_of_delivery_seconds(client, work, clock):
    ids = make_customers(5)
    campaign = make_campaign()
    client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    times = client.get(f"/campaigns/{campaign.id}/delivery-seconds").get_json()
    assert times == {"delivered": 0, "median": None, "p95": None}
    work()
    messages = db.session.scalars(select(OutboundMessage).order_by(OutboundMessage.id)).all()
    for seconds, message in zip((1, 2, 3, 10), messages, strict=False):  # the fifth is never delivered
        clock.advance(seconds=seconds - (clock.now() - message.sent_at).total_seconds())
        deliver(message)
    times = client.get(f"/campaigns/{campaign.id}/delivery-seconds").get_json()
    assert times["delivered"] == 4 and times["median"] == 2.5
    assert round(times["p95"], 6) == 8.95  # 3 + (10 - 3) * 0.85
