"""Webhook posts that carry a bad item: a validly signed (or tokened) post is never a 500. Each receipt and each
customer's message stands alone: the good ones are applied, a bad one (an id over 128 characters, an error code
over 64, a NUL, a lone surrogate, a status of the wrong type, an item the database refuses) is logged, counted
in /metrics and changes nothing, and the post is answered 2xx. Posts are signed as the providers sign them:
Twilio's with Twilio's own `RequestValidator`, WhatsApp's with HMAC-SHA256, Africa's Talking's with its token."""

from __future__ import annotations

import hashlib
import hmac
import json
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from twilio.request_validator import RequestValidator

from app import metrics
from app.extensions import db
from app.models import CustomerOptOut, DeliveryReceipt, OutboundMessage
from tests.factories import make_campaign, make_customer
from tests.test_metrics import scrape, value

PUBLIC_BASE_URL = "https://campaigns.example.com"
WEBHOOK_TOKEN = "at-webhook-token-0123456789"
TWILIO_AUTH_TOKEN = "twilio-auth-token-0123456789"
WHATSAPP_APP_SECRET = "whatsapp-app-secret-0123456789"
LONG_ID = "x" * 129
LONG_CODE = "3" * 65


@pytest.fixture(autouse=True)
def no_counts_of_earlier_tests():
    """Counts an earlier test's app still holds are flushed now, before `redis_conn` empties the test Redis."""
    metrics.flush_all()


@pytest.fixture
def webhooks(app):
    """The webhooks' secrets set, as an operator sets them."""
    app.config.update(
        PUBLIC_BASE_URL=PUBLIC_BASE_URL,
        WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        TWILIO_AUTH_TOKEN=TWILIO_AUTH_TOKEN,
        WHATSAPP_APP_SECRET=WHATSAPP_APP_SECRET,
    )


def post_africastalking(client, path: str, form: dict[str, str]):
    return client.post(f"/webhooks/africastalking/{path}?token={WEBHOOK_TOKEN}", data=form)


def post_twilio(client, path: str, form: dict[str, str]):
    url = f"{PUBLIC_BASE_URL}/webhooks/twilio/{path}"
    signature = RequestValidator(TWILIO_AUTH_TOKEN).compute_signature(url, form)
    return client.post(f"/webhooks/twilio/{path}", data=form, headers={"X-Twilio-Signature": signature})


def whatsapp_body(statuses: list, messages: list | None = None) -> bytes:
    """Meta's envelope around `statuses` (and customers' `messages`); `\\ud800` stays a JSON escape."""
    value = {"messaging_product": "whatsapp", "statuses": statuses}
    if messages:
        value["messages"] = messages
    envelope = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"value": value}]}]}
    return json.dumps(envelope).encode()


def post_whatsapp(client, body: bytes):
    digest = hmac.new(WHATSAPP_APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}
    return client.post("/webhooks/whatsapp", data=body, headers=headers)


def text_message(wa_id: str, body: str) -> dict:
    return {"from": wa_id, "id": "wamid.in", "timestamp": "1", "type": "text", "text": {"body": body}}


def sent_message(provider: str, provider_message_id: str, channel: str = "sms") -> OutboundMessage:
    """A message the provider took, waiting for its receipts."""
    customer = make_customer()
    campaign = make_campaign(channel=channel, status="sent")
    message = OutboundMessage(
        campaign_id=campaign.id,
        customer_id=customer.id,
        status="sent",
        rendered_content="Hi",
        provider=provider,
        provider_message_id=provider_message_id,
    )
    db.session.add(message)
    db.session.commit()
    return message


def status_of(message_id: int) -> str:
    db.session.rollback()
    return db.session.get(OutboundMessage, message_id).status


def opted_out(customer_id: int) -> bool:
    """Whether the customer is opted out of WhatsApp, as committed."""
    db.session.rollback()
    return db.session.get(CustomerOptOut, (customer_id, "whatsapp")) is not None


def kept_receipts() -> int:
    db.session.rollback()
    return len(db.session.scalars(select(DeliveryReceipt)).all())


def refused(client, provider: str, reason: str) -> float:
    return value(scrape(client), "dispatch_webhook_invalid_items_total", provider=provider, reason=reason)


# --- one bad receipt: 200, counted, nothing changed ---

BAD_SMS_RECEIPTS = [
    ("africastalking", {"id": LONG_ID, "status": "Success"}, "too_long"),
    ("africastalking", {"id": "ATXid_1\x00", "status": "Success"}, "characters"),
    ("africastalking", {"id": "ATXid_1", "status": "Failed", "failureReason": "Insufficient" + "x" * 60}, "too_long"),
    ("africastalking", {"id": "ATXid_1", "status": "Rejected", "failureReason": "User\x00InBlackList"}, "characters"),
    ("africastalking", {"status": "Success"}, "missing"),
    ("twilio", {"MessageSid": LONG_ID, "MessageStatus": "delivered"}, "too_long"),
    ("twilio", {"MessageSid": "SM1\x00", "MessageStatus": "delivered"}, "characters"),
    ("twilio", {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": LONG_CODE}, "too_long"),
    ("twilio", {"MessageSid": "SM1", "MessageStatus": "failed", "ErrorCode": "300\x0003"}, "characters"),
]


@pytest.mark.parametrize(("provider", "form", "reason"), BAD_SMS_RECEIPTS)
def test_a_bad_sms_receipt_is_answered_200_counted_and_kept_nowhere(client, webhooks, provider, form, reason):
    if provider == "twilio":
        answer = post_twilio(client, "status", form)
    else:
        answer = post_africastalking(client, "delivery", form)
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {"applied": 0, "unchanged": 0, "kept": 0, "ignored": 0, "invalid": 1, "deferred": 0}
    assert kept_receipts() == 0
    assert refused(client, provider, reason) == 1


BAD_WHATSAPP_STATUSES = [
    ({"id": LONG_ID, "status": "delivered"}, "too_long"),
    ({"id": "wamid.1\x00", "status": "delivered"}, "characters"),
    ({"id": "wamid.\ud800", "status": "delivered"}, "characters"),
    ({"id": "wamid.1", "status": ["delivered"]}, "type"),
    ({"id": "wamid.1", "status": {"delivered": True}}, "type"),
    ({"id": ["wamid.1"], "status": "delivered"}, "type"),
    ({"id": 12345, "status": "read"}, "type"),
    ({"status": "delivered"}, "missing"),
    ({"id": "wamid.1", "status": "failed", "errors": [{"code": LONG_CODE}]}, "too_long"),
    ({"id": "wamid.1", "status": "failed", "errors": [{"code": int(LONG_CODE)}]}, "too_long"),
    ({"id": "wamid.1", "status": "failed", "errors": [{"code": {"value": 131026}}]}, "type"),
    ({"id": "wamid.1", "status": "failed", "errors": [{"code": "1310\ud80026"}]}, "characters"),
    ("delivered", "type"),
]


@pytest.mark.parametrize(("status", "reason"), BAD_WHATSAPP_STATUSES)
def test_a_bad_whatsapp_status_is_answered_200_counted_and_kept_nowhere(client, webhooks, status, reason):
    answer = post_whatsapp(client, whatsapp_body([status]))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {
        "applied": 0,
        "unchanged": 0,
        "kept": 0,
        "ignored": 0,
        "invalid": 1,
        "deferred": 0,
        "inbound": {"opted_out": 0, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0},
    }
    assert kept_receipts() == 0
    assert refused(client, "whatsapp_cloud", reason) == 1


@pytest.mark.parametrize(("bad", "reason"), BAD_WHATSAPP_STATUSES)
def test_a_whatsapp_post_applies_its_good_status_and_a_stop_beside_a_bad_status(client, webhooks, bad, reason):
    message = sent_message("whatsapp_cloud", "wamid.good", channel="whatsapp")
    customer = make_customer(phone="+254733000111")
    body = whatsapp_body(
        [{"id": "wamid.good", "status": "delivered"}, bad],
        [text_message("254733000111", "STOP")],
    )

    answer = post_whatsapp(client, body)

    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {
        "applied": 1,
        "unchanged": 0,
        "kept": 0,
        "ignored": 0,
        "invalid": 1,
        "deferred": 0,
        "inbound": {"opted_out": 1, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0},
    }
    assert status_of(message.id) == "delivered"
    assert opted_out(customer.id)
    assert refused(client, "whatsapp_cloud", reason) == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"from": ["254733000111"], "type": "text", "text": {"body": "STOP"}}, "type"),
        ({"from": "254733000111", "type": "text", "text": {"body": ["STOP"]}}, "type"),
        ({"from": "254733000111", "type": "text", "text": "STOP"}, "type"),
        ("STOP", "type"),
    ],
)
def test_a_bad_customer_message_is_counted_and_the_others_are_applied(client, webhooks, message, reason):
    customer = make_customer(phone="+254733000222")
    answer = post_whatsapp(client, whatsapp_body([], [message, text_message("254733000222", "STOP")]))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["inbound"] == {"opted_out": 1, "opted_in": 0, "ignored": 0, "invalid": 1, "deferred": 0}
    assert opted_out(customer.id)
    assert refused(client, "whatsapp_cloud", reason) == 1


def test_messages_that_are_not_text_are_neither_keywords_nor_bad(client, webhooks):
    image = {"from": "254733000333", "type": "image", "image": {"id": "1"}}
    answer = post_whatsapp(client, whatsapp_body([], [image]))
    assert answer.get_json()["inbound"] == {"opted_out": 0, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0}


# --- an item the database refuses ---


@contextmanager
def database_refuses(table: str, column: str, value: str | int):
    """Make the database refuse (as a `DataError` would) a row of `table` whose `column` is `value`."""
    literal = str(value) if isinstance(value, int) else f"'{value}'"
    dialect = db.engine.dialect.name
    if dialect == "postgresql":
        statements = [
            f"""CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                IF NEW.{column} = {literal} THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22001'; END IF;
                RETURN NEW; END $$""",
            f"CREATE TRIGGER test_refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION test_refuse()",
        ]
        undo = [f"DROP TRIGGER test_refuse ON {table}", "DROP FUNCTION test_refuse()"]
    else:
        statements = [
            f"""CREATE TRIGGER test_refuse BEFORE INSERT ON {table} WHEN NEW.{column} = {literal}
                BEGIN SELECT RAISE(ABORT, 'refused'); END"""
        ]
        undo = ["DROP TRIGGER test_refuse"]
    for statement in statements:
        db.session.execute(text(statement))
    db.session.commit()
    try:
        yield
    finally:
        db.session.rollback()
        for statement in undo:
            db.session.execute(text(statement))
        db.session.commit()


def test_a_receipt_the_database_refuses_does_not_fail_the_others_of_its_post(client, webhooks):
    message = sent_message("whatsapp_cloud", "wamid.good", channel="whatsapp")
    customer = make_customer(phone="+254733000444")
    statuses = [
        {"id": "wamid.good", "status": "delivered"},
        {"id": "wamid.refused", "status": "delivered"},  # no message has it: kept, and the database refuses it
        {"id": "wamid.later", "status": "read"},  # no message has it yet: kept
    ]
    with database_refuses("delivery_receipts", "provider_message_id", "wamid.refused"):
        answer = post_whatsapp(client, whatsapp_body(statuses, [text_message("254733000444", "STOP")]))

    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {
        "applied": 1,
        "unchanged": 0,
        "kept": 1,
        "ignored": 0,
        "invalid": 1,
        "deferred": 0,
        "inbound": {"opted_out": 1, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0},
    }
    assert status_of(message.id) == "delivered"
    assert [r.provider_message_id for r in db.session.scalars(select(DeliveryReceipt))] == ["wamid.later"]
    assert opted_out(customer.id)
    assert refused(client, "whatsapp_cloud", "database") == 1


def test_a_single_receipt_the_database_refuses_is_answered_200(client, webhooks):
    with database_refuses("delivery_receipts", "provider_message_id", "SMrefused"):
        answer = post_twilio(client, "status", {"MessageSid": "SMrefused", "MessageStatus": "delivered"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json() == {"applied": 0, "unchanged": 0, "kept": 0, "ignored": 0, "invalid": 1, "deferred": 0}
    assert refused(client, "twilio", "database") == 1


def test_an_opt_out_the_database_refuses_does_not_fail_the_others_of_its_post(client, webhooks):
    refused_customer = make_customer(phone="+254733000555")
    customer = make_customer(phone="+254733000666")
    messages = [text_message("254733000555", "STOP"), text_message("254733000666", "STOP")]
    with database_refuses("customer_opt_outs", "customer_id", refused_customer.id):
        answer = post_whatsapp(client, whatsapp_body([], messages))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["inbound"] == {"opted_out": 1, "opted_in": 0, "ignored": 0, "invalid": 1, "deferred": 0}
    assert opted_out(customer.id)
    assert not opted_out(refused_customer.id)


# --- whatever a signed post holds ---

# JSON values of every kind, strings with NUL, control characters and lone surrogates among them.
json_text = st.text(st.characters(exclude_categories=()), max_size=140)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_text, inner, max_size=3),
    max_leaves=6,
)
status_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": json_text | json_values,
        "status": st.sampled_from(["sent", "delivered", "read", "failed", "deleted"]) | json_values,
        "errors": st.lists(st.dictionaries(st.sampled_from(["code", "title", "error_data"]), json_values)),
        "recipient_id": json_values,
    },
)
statuses = st.lists(status_fields | json_values, max_size=4)
messages = st.lists(
    st.fixed_dictionaries(
        {}, optional={"from": json_text | json_values, "type": json_values, "text": json_values | st.just({})}
    )
    | json_values,
    max_size=3,
)
FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


def test_no_signed_whatsapp_post_is_a_server_error_and_its_good_status_is_applied(client, webhooks):
    message = sent_message("whatsapp_cloud", "wamid.good", channel="whatsapp")

    @FUZZ
    @given(statuses, messages)
    def post(others, inbound):
        answer = post_whatsapp(client, whatsapp_body([{"id": "wamid.good", "status": "read"}, *others], inbound))
        assert answer.status_code == 200, answer.get_json()
        counts = answer.get_json()
        assert sum(counts[k] for k in ("applied", "unchanged", "kept", "ignored", "invalid")) == 1 + len(others)
        assert status_of(message.id) == "delivered"

    post()


# A form field is UTF-8 text: short, or about as long as the columns it may land in.
form_text = st.text(st.characters(codec="utf-8"), max_size=20) | st.text(
    st.characters(codec="utf-8"), min_size=60, max_size=140
)
africastalking_forms = st.fixed_dictionaries(
    {},
    optional={
        "id": form_text,
        "status": st.sampled_from(["Success", "Failed", "Rejected", "Sent"]) | form_text,
        "failureReason": form_text,
        "from": form_text,
        "text": st.just("STOP") | form_text,
        "phoneNumber": form_text,
    },
)
twilio_forms = st.fixed_dictionaries(
    {},
    optional={
        "MessageSid": form_text,
        "MessageStatus": st.sampled_from(["delivered", "undelivered", "failed", "read", "sent"]) | form_text,
        "ErrorCode": form_text,
        "From": form_text,
        "Body": st.just("STOP") | form_text,
    },
)


def test_no_tokened_or_signed_sms_callback_is_a_server_error(client, webhooks):
    @FUZZ
    @given(
        st.tuples(st.sampled_from(["delivery", "inbound", "opt-out"]), africastalking_forms)
        | st.tuples(st.sampled_from(["status", "inbound"]), twilio_forms).map(lambda pair: ("twilio", *pair))
    )
    def post(call):
        if call[0] == "twilio":
            answer = post_twilio(client, call[1], call[2])
        else:
            answer = post_africastalking(client, *call)
        assert answer.status_code == 200, answer.get_data(as_text=True)

    post()
