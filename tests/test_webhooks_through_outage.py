"""Receipts and customers' keywords that come while PostgreSQL is down: providers do not post a callback
twice, so each verified one is kept in Redis, answered 2xx, and applied when PostgreSQL returns, in order,
once. A private cluster, stopped by the test; the shared server is never touched."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from twilio.request_validator import RequestValidator

from app.extensions import db
from app.messaging import deferred, spool
from app.models import CustomerOptOut, OutboundMessage
from tests.conftest import serve
from tests.factories import make_campaign, make_customer

pytestmark = pytest.mark.real_only

AUTH_TOKEN = "outage-token"


def signed_post(client, url: str, path: str, form: dict):
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url + path, form)
    return client.post(path, data=form, headers={"X-Twilio-Signature": signature})


@pytest.fixture
def twilio_app(private_app):
    """The private cluster's app, answering Twilio's webhooks."""
    private_app.config.update(
        SMS_PROVIDER="twilio",
        TWILIO_ACCOUNT_SID="AC" + "0" * 32,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_FROM="+15005550006",
    )
    return private_app


def test_receipts_and_keywords_during_an_outage_are_kept_in_redis_and_applied_in_order_once(
    twilio_app, pg_server, redis_conn
):
    customer = make_customer(phone="+254712000900")
    campaign = make_campaign()
    message = OutboundMessage(
        campaign_id=campaign.id, customer_id=customer.id, status="sent", provider="twilio", provider_message_id="SM-out"
    )
    db.session.add(message)
    db.session.commit()
    message_id, customer_id, phone = message.id, customer.id, customer.phone
    db.session.remove()

    with serve(twilio_app) as url:
        twilio_app.config["PUBLIC_BASE_URL"] = url
        client = twilio_app.test_client()
        pg_server.stop()
        try:
            answers = [
                signed_post(
                    client, url, "/webhooks/twilio/status", {"MessageSid": "SM-out", "MessageStatus": "delivered"}
                ),
                # A customer changes their mind twice while the database is down: the last word counts.
                signed_post(client, url, "/webhooks/twilio/inbound", {"From": phone, "Body": "STOP"}),
                signed_post(client, url, "/webhooks/twilio/inbound", {"From": phone, "Body": "START"}),
                signed_post(client, url, "/webhooks/twilio/inbound", {"From": phone, "Body": "STOP"}),
                # A repeat of the receipt (the provider's own retry, or a second status): applied once.
                signed_post(
                    client, url, "/webhooks/twilio/status", {"MessageSid": "SM-out", "MessageStatus": "delivered"}
                ),
            ]
        finally:
            pg_server.start()
    assert [a.status_code for a in answers] == [200] * 5
    assert answers[0].get_json() == {"applied": 0, "unchanged": 0, "kept": 0, "ignored": 0, "invalid": 0, "deferred": 1}
    assert redis_conn.llen(spool.INBOUND_KEY) == 5

    db.session.remove()
    db.engine.dispose()  # the pooled connections died with the server
    assert deferred.drain() == 5
    assert redis_conn.llen(spool.INBOUND_KEY) == 0
    db.session.rollback()
    assert db.session.get(OutboundMessage, message_id).status == "delivered"
    opt_outs = db.session.scalars(select(CustomerOptOut.channel).where(CustomerOptOut.customer_id == customer_id))
    assert list(opt_outs) == ["sms"]  # STOP, START, STOP: opted out
    assert deferred.drain() == 0  # nothing twice


def test_with_redis_down_too_a_webhook_fails_so_that_it_is_not_lost_silently(twilio_app, pg_server, private_redis):
    from redis import Redis

    twilio_app.extensions["redis"] = Redis.from_url(private_redis.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    private_redis.stop()
    with serve(twilio_app) as url:
        twilio_app.config["PUBLIC_BASE_URL"] = url
        pg_server.stop()
        try:
            answer = signed_post(
                twilio_app.test_client(),
                url,
                "/webhooks/twilio/status",
                {"MessageSid": "SM-x", "MessageStatus": "delivered"},
            )
        finally:
            pg_server.start()
    assert answer.status_code == 503  # neither could take it: the provider is told so


def test_a_kept_receipt_names_a_provider_id_no_message_has_yet_and_waits_in_the_database(twilio_app, redis_conn):
    """Outside an outage nothing waits in Redis: a receipt with no message is kept in the database."""
    with serve(twilio_app) as url:
        twilio_app.config["PUBLIC_BASE_URL"] = url
        answer = signed_post(
            twilio_app.test_client(),
            url,
            "/webhooks/twilio/status",
            {"MessageSid": "SM-none", "MessageStatus": "delivered"},
        )
    assert answer.get_json()["kept"] == 1 and answer.get_json()["deferred"] == 0
    assert redis_conn.llen(spool.INBOUND_KEY) == 0
    assert db.session.scalar(text("SELECT count(*) FROM delivery_receipts")) == 1
