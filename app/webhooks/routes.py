"""Webhooks the providers call: delivery receipts, and the messages customers send us (a `STOP` or
`START` reply opts them out of the channel or back in: `app.customers.optouts`). They need no API key
and are not rate limited (a provider posts thousands a minute from a few addresses); each carries the
provider's own proof instead (a signature, or Africa's Talking's `?token=`), checked before anything
else. A wrong or missing one is a 403 in the error shape, logged, and changes nothing. Every receipt that
passes is answered 2xx, whether it changed a message, repeated an earlier one, or names a message not
recorded yet (kept: see `app.messaging.receipts`), so that providers do not retry it; so is every
customer's message, a keyword or not, from a customer's number or not.

Each item of a post (a receipt, a customer's message) stands alone. One that cannot be read (the
providers' parsers raise `BadItem`), or that the database refuses when it is applied, is logged, counted
in `/metrics` (`dispatch_webhook_invalid_items_total`) and answered as `invalid`; the others are applied,
and the post is answered 2xx. While the database is unavailable, what a post brought waits in Redis in its
order (`app.messaging.spool`: answered `deferred`, applied when the database returns); only a post that
neither the database nor Redis takes fails (a 503)."""

from __future__ import annotations

import hmac
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from flask import current_app, request
from marshmallow import Schema, fields
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import UnsupportedMediaType

from app import metrics
from app.blueprint import NOT_JSON, Blueprint
from app.customers import optouts
from app.database import describe, is_unavailable
from app.errors import AppError
from app.extensions import db
from app.messaging import receipts, spool
from app.messaging.providers import africastalking, twilio, whatsapp_cloud
from app.messaging.providers.base import BadItem
from app.models import Channel, OptOutSource
from app.queues import get_redis
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
    invalid = fields.Integer(
        required=True,
        metadata={"description": "Receipts that could not be read, or that the database refused: logged and counted."},
    )
    deferred = fields.Integer(
        required=True,
        metadata={
            "description": "Receipts kept in Redis while the database is unavailable: applied, in order, when it "
            "returns."
        },
    )


class InboundAnswerSchema(Schema):
    opted_out = fields.Integer(required=True, metadata={"description": "Customers opted out by this post."})
    opted_in = fields.Integer(required=True, metadata={"description": "Customers opted back in by this post."})
    ignored = fields.Integer(
        required=True, metadata={"description": "Messages that are no keyword, or from a number no customer has."}
    )
    invalid = fields.Integer(
        required=True,
        metadata={"description": "Messages that could not be read, or that the database refused: logged and counted."},
    )
    deferred = fields.Integer(
        required=True,
        metadata={
            "description": "Keywords kept in Redis while the database is unavailable: applied, in order, when it "
            "returns."
        },
    )


class WhatsAppAnswerSchema(ReceiptAnswerSchema):
    inbound = fields.Nested(InboundAnswerSchema, required=True, metadata={"description": "The post's `messages[]`."})


T = TypeVar("T")
R = TypeVar("R")


def _read(provider: str, read: Callable[[T], R | None], items: Iterable[T]) -> tuple[list[R], int, int]:
    """Each of a post's `items` read on its own: what `read` found, how many it ignored (None), and how many
    it could not read (`BadItem`: logged once for the post, and counted by reason)."""
    found: list[R] = []
    ignored = 0
    bad: Counter[tuple[str, str]] = Counter()
    for item in items:
        try:
            result = read(item)
        except BadItem as exc:
            bad[(exc.field, exc.reason)] += 1
            continue
        if result is None:
            ignored += 1
        else:
            found.append(result)
    if bad:
        refused = {f"{field}: {reason}": count for (field, reason), count in bad.items()}
        log.warning("webhook items refused", extra={"provider": provider, "refused": refused})
        metrics.count_invalid_webhook_items(provider, (reason for _, reason in bad.elements()))
    return found, ignored, sum(bad.values())


@contextmanager
def _item(provider: str, counts: dict[str, int]) -> Iterator[None]:
    """Apply one item: if the database refuses it (a value it cannot store, a constraint), roll it back, log
    it and count it `invalid`, so that the post's other items still apply. A database that is unavailable
    fails the post instead (a 503: the provider sends it again)."""
    try:
        yield
    except Exception as exc:  # whatever one item does, the others of the post must apply
        db.session.rollback()
        if is_unavailable(exc):
            raise
        log.warning("webhook item refused by the database", extra={"provider": provider, "error": describe(exc)})
        metrics.count_invalid_webhook_items(provider, ["database"])
        counts["invalid"] += 1


def _answer(provider: str, found: list[receipts.Receipt], ignored: int, invalid: int) -> dict:
    """Apply a post's receipts, all in one transaction; if the database refuses one of them, each again on
    its own, so that only that one is lost. While the database is unavailable, those not applied yet wait
    in Redis (`spool`). Counts what became of them."""
    counts = {"applied": 0, "unchanged": 0, "kept": 0, "ignored": ignored, "invalid": invalid, "deferred": 0}
    done = 0
    try:
        if len(found) > 1:
            try:
                return {**counts, **receipts.record(found)}
            except Exception as exc:  # one receipt the database refused: the others go one by one below
                db.session.rollback()
                if is_unavailable(exc):
                    raise
        for receipt in found:
            with _item(provider, counts):
                for result, count in receipts.record([receipt]).items():
                    counts[result] = counts.get(result, 0) + count
            done += 1
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        _defer(provider, exc, lambda redis: spool.keep_receipts(redis, found[done:]), "receipt", len(found) - done)
        counts["deferred"] = len(found) - done
    return counts


def _defer(provider: str, error: BaseException, keep: Callable[[Redis], None], kind: str, count: int) -> None:
    """The database is unavailable: keep what a post brought in Redis with `keep`, to be applied when it
    returns. With Redis unavailable too, the post fails (a 503) with the database's error."""
    try:
        keep(get_redis())
    except RedisError:
        log.warning("webhook items: neither the database nor Redis takes them", extra={"provider": provider})
        raise error from None
    metrics.count_spooled(kind, count)
    log.warning(
        "the database is unavailable: webhook items wait in Redis",
        extra={"provider": provider, "kind": kind, "items": count, "error": describe(error)},
    )


def _inbound(provider: str, messages: list[tuple[str, str]], channel: str, invalid: int = 0) -> dict:
    """Apply the keywords among `(from, text)` messages customers sent on `channel`, each committed (or, while
    the database is unavailable, kept in Redis in their order)."""
    counts = {"opted_out": 0, "opted_in": 0, "ignored": 0, "invalid": invalid, "deferred": 0}
    actions = []
    for sender, text in messages:
        action = optouts.keyword_action(text)
        if action is None:
            counts["ignored"] += 1
        else:
            actions.append((optouts.inbound_phone(sender), action, OptOutSource.KEYWORD))
    _apply_keywords(provider, actions, channel, counts)
    return counts


def _apply_keywords(provider: str, actions: list[tuple[str | None, str, str]], channel: str, counts: dict) -> None:
    """Apply `(phone, action, source)` opt-outs and opt-ins in order, each committed; while the database is
    unavailable, keep those not applied yet in Redis, in their order."""
    done = 0
    try:
        for phone, action, source in actions:
            with _item(provider, counts):
                found = optouts.apply_by_phone(phone, channel, action, source)
                counts["ignored" if not found else "opted_out" if action == "opt_out" else "opted_in"] += 1
            done += 1
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        left = actions[done:]

        def keep(redis: Redis) -> None:
            for phone, action, source in left:
                spool.keep_keyword(redis, phone, channel, action, source)

        _defer(provider, exc, keep, "keyword", len(left))
        counts["deferred"] = len(left)


def _body(content_type: str, description: str) -> dict:
    """An OpenAPI request body of a provider's own shape (documented by the provider, not here)."""
    return {"required": True, "content": {content_type: {"schema": {"type": "object"}}}, "description": description}


def _refuse(provider: str, why: str) -> Forbidden:
    log.warning("webhook refused", extra={"provider": provider, "reason": why, "remote_addr": request.remote_addr})
    return Forbidden(f"{provider} webhook: {why}")


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
    provider = africastalking.AfricasTalking.name
    return _answer(provider, *_read(provider, africastalking.receipt_from_form, [request.form]))


@bp.route("/africastalking/inbound", methods=["POST"])
@bp.doc(security=[], requestBody=_body(FORM, "An SMS a customer sent (`from`, `to`, `text`, `date`, `id`); `?token=`."))
@bp.response(200, InboundAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def africastalking_inbound():
    """An incoming SMS from Africa's Talking: an opt-out or opt-in keyword changes the sender's sms opt-out"""
    _check_africastalking_token()
    message = (request.form.get("from", ""), request.form.get("text", ""))
    return _inbound(africastalking.AfricasTalking.name, [message], Channel.SMS)


@bp.route("/africastalking/opt-out", methods=["POST"])
@bp.doc(
    security=[], requestBody=_body(FORM, "Africa's Talking bulk-SMS opt-out (`senderId`, `phoneNumber`), `?token=`")
)
@bp.response(200, InboundAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def africastalking_opt_out():
    """Africa's Talking's opt-out notification: the number opted out of the sender id: opted out of sms"""
    _check_africastalking_token()
    counts = {"opted_out": 0, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0}
    phone = optouts.inbound_phone(request.form.get("phoneNumber", ""))
    _apply_keywords(
        africastalking.AfricasTalking.name, [(phone, "opt_out", OptOutSource.PROVIDER)], Channel.SMS, counts
    )
    return counts


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
    message = (request.form.get("From", ""), request.form.get("Body", ""))
    counts = _inbound(twilio.Twilio.name, [message], Channel.SMS)
    log.info("twilio inbound message", extra=counts)
    return current_app.response_class(EMPTY_TWIML, mimetype="text/xml")


@bp.route("/twilio/status", methods=["POST"])
@bp.doc(security=[], requestBody=_body(FORM, "Twilio status callback, signed in `X-Twilio-Signature`."))
@bp.response(200, ReceiptAnswerSchema)
@bp.alt_response(403, **FORBIDDEN)
def twilio_status():
    """Status callback from Twilio"""
    _check_twilio_signature()
    return _answer(twilio.Twilio.name, *_read(twilio.Twilio.name, twilio.receipt_from_form, [request.form]))


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
    provider = whatsapp_cloud.WhatsAppCloud.name
    answer = _answer(provider, *_read(provider, whatsapp_cloud.receipt_from_status, whatsapp_cloud.statuses(payload)))
    texts, _, invalid = _read(provider, whatsapp_cloud.inbound_text, whatsapp_cloud.messages(payload))
    return {**answer, "inbound": _inbound(provider, texts, Channel.WHATSAPP, invalid)}
