"""Webhooks the providers call: delivery receipts, and the messages customers send us (a `STOP` or
`START` reply opts them out of the channel or back in: `app.customers.optouts`). They need no API key
and are not rate limited (a provider posts thousands a minute from a few addresses); each carries the
provider's own proof instead (a signature, or Africa's Talking's `?token=`), checked before anything
else. A wrong or missing one is a 403 in the error shape, logged, and changes nothing. Every receipt that
passes is answered 2xx, whether it changed a message, repeated an earlier one, or names a message not
recorded yet (kept: see `app.messaging.receipts`), so that providers do not retry it; so is every
customer's message, a keyword or not, from a customer's number or not."""

from __future__ import annotations

import hmac
import json
import logging

from flask import current_app, request
from marshmallow import Schema, fields
from werkzeug.exceptions import UnsupportedMediaType

from app.blueprint import NOT_JSON, Blueprint
from app.customers import optouts
from app.errors import AppError
from app.messaging import receipts
from app.messaging.providers import africastalking, twilio, whatsapp_cloud
from app.models import Channel, OptOutSource
from app.schemas import ErrorSchema

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks", description="Delivery receipts from the providers")


class Forbidden(AppError):
    code = 403


class ReceiptAnswerSchema(Schema):
    applied = fields.Integer(required=True, metadata={"description": "Receipts that changed a message."})
    unchanged = fields.Integer(required=True, metadata={"description": "Repeats, and late or older statuses."})
    kept = fields.Integer(
        required=True, metadata={"description": "Receipts for a provider id no message has yet, kept."}
    )
    ignored = fields.Integer(required=True, metadata={"description": "Statuses that change nothing (`sent`, ...)."})


class InboundAnswerSchema(Schema):
    opted_out = fields.Integer(required=True, metadata={"description": "Customers opted out by this post."})
    opted_in = fields.Integer(required=True, metadata={"description": "Customers opted back in by this post."})
    ignored = fields.Integer(
        required=True, metadata={"description": "Messages that are no keyword, or from a number no customer has."}
    )


class WhatsAppAnswerSchema(ReceiptAnswerSchema):
    inbound = fields.Nested(InboundAnswerSchema, required=True, metadata={"description": "The post's `messages[]`."})


def _inbound(messages: list[tuple[str, str]], channel: str) -> dict:
    """Apply the keywords among `(from, text)` messages customers sent on `channel`, each committed."""
    counts = {"opted_out": 0, "opted_in": 0, "ignored": 0}
    for sender, text in messages:
        action = optouts.keyword_action(text)
        if action is None or not optouts.apply_by_phone(
            optouts.inbound_phone(sender), channel, action, OptOutSource.KEYWORD
        ):
            counts["ignored"] += 1
        else:
            counts["opted_out" if action == "opt_out" else "opted_in"] += 1
    return counts


def _body(content_type: str, description: str) -> dict:
    """An OpenAPI request body of a provider's own shape (documented by the provider, not here)."""
    return {"required": True, "content": {content_type: {"schema": {"type": "object"}}}, "description": description}


def _refuse(provider: str, why: str) -> Forbidden:
    log.warning("webhook refused", extra={"provider": provider, "reason": why, "remote_addr": request.remote_addr})
    return Forbidden(f"{provider} webhook: {why}")


def _answer(found: list[receipts.Receipt], seen: int) -> dict:
    counts = receipts.record(found) if found else {"applied": 0, "unchanged": 0, "kept": 0}
    return {**counts, "ignored": seen - len(found)}


FORM = "application/x-www-form-urlencoded"
FORBIDDEN = {"schema": ErrorSchema, "description": "Missing or wrong signature (or token)"}


def _check_africastalking_token() -> None:
    expected = current_app.config["WEBHOOK_TOKEN"]
    token = request.args.get("token", "")
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise _refuse("africastalking", "wrong or missing token")


@bp.route("/africastalking/delivery", methods=["POST"])
@bp.doc(security=[], requestBody=_body(FORM, "Africa's Talking delivery report; `?token=` must be WEBHOOK_TOKEN."))
@bp.response(200, ReceiptAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def africastalking_delivery():
    """Delivery report from Africa's Talking"""
    _check_africastalking_token()
    receipt = africastalking.receipt_from_form(request.form)
    return _answer([receipt] if receipt else [], 1)


@bp.route("/africastalking/inbound", methods=["POST"])
@bp.doc(security=[], requestBody=_body(FORM, "An SMS a customer sent (`from`, `to`, `text`, `date`, `id`); `?token=`."))
@bp.response(200, InboundAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def africastalking_inbound():
    """An incoming SMS from Africa's Talking: an opt-out or opt-in keyword changes the sender's sms opt-out"""
    _check_africastalking_token()
    return _inbound([(request.form.get("from", ""), request.form.get("text", ""))], Channel.SMS)


@bp.route("/africastalking/opt-out", methods=["POST"])
@bp.doc(
    security=[], requestBody=_body(FORM, "Africa's Talking bulk-SMS opt-out (`senderId`, `phoneNumber`), `?token=`")
)
@bp.response(200, InboundAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def africastalking_opt_out():
    """Africa's Talking's opt-out notification: the number opted out of the sender id: opted out of sms"""
    _check_africastalking_token()
    phone = optouts.inbound_phone(request.form.get("phoneNumber", ""))
    found = optouts.apply_by_phone(phone, Channel.SMS, "opt_out", OptOutSource.PROVIDER)
    return {"opted_out": int(found), "opted_in": 0, "ignored": int(not found)}


def _check_twilio_signature() -> None:
    token = current_app.config["TWILIO_AUTH_TOKEN"]
    given = request.headers.get("X-Twilio-Signature", "")
    expected = twilio.signature(_public_url(), request.form.items(multi=True), token) if token else ""
    if not token or not hmac.compare_digest(given.encode(), expected.encode()):
        raise _refuse("twilio", "wrong or missing X-Twilio-Signature")


# An empty TwiML answer: Twilio sends no reply of ours (its own STOP and START replies are its business).
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


@bp.route("/twilio/inbound", methods=["POST"])
@bp.doc(
    security=[],
    requestBody=_body(FORM, "A customer's SMS (`From`, `To`, `Body`), signed in `X-Twilio-Signature`"),
)
@bp.response(200, {"type": "string"}, content_type="text/xml", description="Empty TwiML: no reply")
@bp.alt_response(403, **FORBIDDEN)
def twilio_inbound():
    """An incoming SMS from Twilio: an opt-out or opt-in keyword changes the sender's sms opt-out"""
    _check_twilio_signature()
    counts = _inbound([(request.form.get("From", ""), request.form.get("Body", ""))], Channel.SMS)
    log.info("twilio inbound message", extra=counts)
    return current_app.response_class(EMPTY_TWIML, mimetype="text/xml")


@bp.route("/twilio/status", methods=["POST"])
@bp.doc(security=[], requestBody=_body(FORM, "Twilio status callback, signed in `X-Twilio-Signature`."))
@bp.response(200, ReceiptAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def twilio_status():
    """Status callback from Twilio"""
    _check_twilio_signature()
    receipt = twilio.receipt_from_form(request.form)
    return _answer([receipt] if receipt else [], 1)


def _public_url() -> str:
    """The URL Twilio posted to, as it signed it: `PUBLIC_BASE_URL` with this path and query (behind a
    proxy the request's own URL is not the public one), or the request's URL without that setting."""
    public = current_app.config["PUBLIC_BASE_URL"]
    if not public:
        return request.url
    query = request.query_string.decode("latin-1")
    return public + request.path + (f"?{query}" if query else "")


class VerifyQuerySchema(Schema):
    mode = fields.String(data_key="hub.mode")
    verify_token = fields.String(data_key="hub.verify_token")
    challenge = fields.String(data_key="hub.challenge")


@bp.route("/whatsapp", methods=["GET"])
@bp.doc(security=[])
@bp.arguments(VerifyQuerySchema, location="query")
@bp.response(200, {"type": "string"}, content_type="text/plain", description="The `hub.challenge`, as it came")
@bp.alt_response(403, **FORBIDDEN)
def whatsapp_verify(query):
    """Meta's webhook verification: echoes `hub.challenge` when `hub.verify_token` matches"""
    expected = current_app.config["WHATSAPP_VERIFY_TOKEN"]
    given = query.get("verify_token", "")
    if query.get("mode") != "subscribe" or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise _refuse("whatsapp", "wrong hub.mode or hub.verify_token")
    return current_app.response_class(query.get("challenge", ""), mimetype="text/plain")


@bp.route("/whatsapp", methods=["POST"])
@bp.doc(security=[], requestBody=_body("application/json", "WhatsApp Cloud API post, signed in X-Hub-Signature-256."))
@bp.response(200, WhatsAppAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def whatsapp_statuses():
    """Statuses and customers' messages from the WhatsApp Cloud API (one post may carry many of both)"""
    secret = current_app.config["WHATSAPP_APP_SECRET"]
    body = request.get_data(cache=True)
    given = request.headers.get("X-Hub-Signature-256", "")
    if not secret or not hmac.compare_digest(given.encode(), whatsapp_cloud.signature(body, secret).encode()):
        raise _refuse("whatsapp", "wrong or missing X-Hub-Signature-256")
    if not request.is_json:
        raise UnsupportedMediaType(NOT_JSON)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise AppError("the body is not JSON") from None
    answer = _answer(whatsapp_cloud.receipts_from_payload(payload), len(whatsapp_cloud.statuses(payload)))
    return {**answer, "inbound": _inbound(whatsapp_cloud.inbound_texts(payload), Channel.WHATSAPP)}
