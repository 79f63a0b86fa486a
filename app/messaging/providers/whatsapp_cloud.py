"""The WhatsApp Business Cloud API: `POST {base}/{version}/{phone_number_id}/messages` (Bearer token), JSON
`{"messaging_product": "whatsapp", "to": ..., "type": "text" | "template", ...}`. The answer's
`messages[0].id` (`wamid...`) is the message's id; an error answer's `error.code` is classified below
(Meta's error code table). Free text reaches a customer only within 24 h of their last message (else
131047): campaigns outside that window name an approved template. Statuses come to `/webhooks/whatsapp`,
signed with the app secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from datetime import timedelta

from flask import Flask

from app.messaging.fallback_spec import UNDELIVERABLE, WINDOW_CLOSED, triggers_on
from app.messaging.providers.base import (
    MAX_CODE_LENGTH,
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    BadItem,
    OutgoingMessage,
    Receipt,
    SendResult,
    free_text,
    identifier,
    optional_identifier,
)
from app.messaging.providers.http import http_client, json_or_none, post, retry_after, unexpected
from app.models import ErrorClass, MessageStatus

# error.code -> class. Other codes: 5xx transient, 4xx permanent.
CLASSES = {
    131026: ErrorClass.PERMANENT,  # message undeliverable
    131047: ErrorClass.PERMANENT,  # more than 24 h since the customer's last message: use a template
    131051: ErrorClass.PERMANENT,  # unsupported message type
    131050: ErrorClass.PERMANENT,  # the user stopped marketing messages
    100: ErrorClass.PERMANENT,  # invalid parameter
    131000: ErrorClass.TRANSIENT,  # something went wrong
    # Held back by Meta: it comes in a failed status (held 24 h there, `HELD_BACK`); should the send's answer
    # carry it, it is retried like a transient failure.
    131049: ErrorClass.TRANSIENT,
    131016: ErrorClass.TRANSIENT,  # service unavailable
    1: ErrorClass.TRANSIENT,  # API unknown
    2: ErrorClass.TRANSIENT,  # API service
    130429: ErrorClass.THROTTLED,  # throughput exceeded
    131056: ErrorClass.THROTTLED,  # too many messages to this recipient (pair rate limit)
    131048: ErrorClass.THROTTLED,  # spam rate limit
    4: ErrorClass.THROTTLED,  # too many calls
    80007: ErrorClass.THROTTLED,  # rate limit
    190: ErrorClass.ACCOUNT,  # access token invalid or expired
    10: ErrorClass.ACCOUNT,  # permission denied
    200: ErrorClass.ACCOUNT,  # permission denied
    131031: ErrorClass.ACCOUNT,  # account locked
    131042: ErrorClass.ACCOUNT,  # payment problem
    132000: ErrorClass.ACCOUNT,  # template parameters do not match the template
    132001: ErrorClass.ACCOUNT,  # template does not exist
    368: ErrorClass.ACCOUNT,  # temporarily blocked for policy violations
}


class WhatsAppCloud:
    name = "whatsapp_cloud"

    def __init__(self, app: Flask, access_token: str, phone_number_id: str, version: str, base_url: str):
        self.app = app
        self.headers = {"Authorization": f"Bearer {access_token}"}
        self.url = f"{base_url}/{version}/{phone_number_id}/messages"

    @classmethod
    def from_config(cls, app: Flask) -> WhatsAppCloud:
        config = app.config
        return cls(
            app,
            config["WHATSAPP_ACCESS_TOKEN"],
            config["WHATSAPP_PHONE_NUMBER_ID"],
            config["WHATSAPP_API_VERSION"],
            config["WHATSAPP_BASE_URL"],
        )

    def send(self, message: OutgoingMessage) -> SendResult:
        response = post(http_client(self.app), self.url, json=payload(message), headers=self.headers)
        if isinstance(response, SendResult):
            return response
        body = json_or_none(response) or {}
        messages = body.get("messages")
        if response.status_code == 200 and isinstance(messages, list) and messages and messages[0].get("id"):
            return SendResult.accepted(str(messages[0]["id"]))
        error = body.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("code"), int):
            return unexpected(response, "WhatsApp")
        code = error["code"]
        default = ErrorClass.TRANSIENT if response.status_code >= 500 else ErrorClass.PERMANENT
        error_class = ErrorClass.THROTTLED if response.status_code == 429 else CLASSES.get(code, default)
        details = (error.get("error_data") or {}).get("details") if isinstance(error.get("error_data"), dict) else None
        text = f"WhatsApp {code}: {error.get('message') or response.reason_phrase}" + (
            f" ({details})" if details else ""
        )
        result = SendResult.refused(error_class, text, code, retry_after(response))
        return replace(result, recipient_opted_out=True) if code == OPTED_OUT else result


def payload(message: OutgoingMessage) -> dict:
    """The Cloud API's JSON for `message`: its template with one body parameter per placeholder, or text."""
    to = message.phone.removeprefix("+")
    if message.template is None:
        return {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": message.body}}
    template = {"name": message.template.name, "language": {"code": message.template.language}}
    if message.template.parameters:
        parameters = [{"type": "text", "text": value} for value in message.template.parameters]
        template["components"] = [{"type": "body", "parameters": parameters}]
    return {"messaging_product": "whatsapp", "to": to, "type": "template", "template": template}


# The user stopped marketing messages from the business: they are opted out of WhatsApp here too (source
# `provider`), whether the send's answer or a failed status says it, and nothing else is tried.
OPTED_OUT = 131050
# Meta held a marketing message back to keep the user's engagement healthy: not a failure of the number, and
# not one to retry soon. A failed status with it holds the message for `HOLD` and tries again, once
# (`lifecycle.hold_for_provider`); held again, it fails for good.
HELD_BACK = "131049"
HOLD = timedelta(hours=24)

# A failure's code, in the send's answer or a failed status -> the SMS fallback trigger it is
# (app.messaging.fallback); no other code triggers one by itself. 131026: the number cannot get WhatsApp
# messages (no account, an old app, terms not accepted). 131047: a text outside the 24-hour customer service
# window. Never 131050 (`OPTED_OUT`): the customer asked for less marketing, not for another channel.
FALLBACK_TRIGGERS = {"131026": UNDELIVERABLE, "131047": WINDOW_CLOSED}


def fallback_codes(spec: dict | None) -> list[str]:
    """The codes whose failure triggers this `sms_fallback`."""
    return [code for code, trigger in FALLBACK_TRIGGERS.items() if triggers_on(spec, trigger)]


# What a failed status's code asks beyond the failure (`app.messaging.providers.receipt_opts_out` and
# `receipt_hold`).
RECEIPT_OPTS_OUT = frozenset({str(OPTED_OUT)})
RECEIPT_HOLDS = {HELD_BACK: HOLD}

# A failed status's first error code -> permanent: the recipient can never receive this message, so
# retry-failed does not send it again. Any other code (131049 held back by Meta, 131000, 131053, ...) is
# transient.
RECEIPT_PERMANENT = {
    "131026",  # message undeliverable (no WhatsApp account, old app, ...)
    "131047",  # more than 24 h since the customer's last message: only a template would go
    "131050",  # the user stopped marketing messages
    "131051",  # unsupported message type
    "131021",  # the recipient is the sender
}


def receipt_error_class(code: str | None) -> str:
    """The class of a failed status's first error code."""
    return ErrorClass.PERMANENT if code in RECEIPT_PERMANENT else ErrorClass.TRANSIENT


# A status's `status` -> the message status it means (`read` is delivered, and read); `sent` changes nothing.
RECEIPT_STATUSES = {
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "failed": MessageStatus.FAILED,
}


def signature(body: bytes, app_secret: str) -> str:
    """Meta's `X-Hub-Signature-256`: `sha256=` and the hex HMAC-SHA256 of the raw body, keyed with the app
    secret."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def receipt_from_status(status: object) -> Receipt | None:
    """The receipt of one status of a webhook post (`id`, `status`, `errors[]`), or None for a status that
    changes nothing (`sent`, or one this service does not know). A status that cannot be read (not an
    object; an `id` or `status` missing or not a string; an `id` or a failure's error code longer than its
    column or not printable text) raises `BadItem`."""
    if not isinstance(status, dict):
        raise BadItem("status", "type")
    name = status.get("status")
    if name is None or name == "":
        raise BadItem("status.status", "missing")
    if not isinstance(name, str):
        raise BadItem("status.status", "type")
    message_status = RECEIPT_STATUSES.get(name)
    if message_status is None:
        return None
    wamid = identifier(status.get("id"), "status.id", MAX_ID_LENGTH)
    if message_status != MessageStatus.FAILED:
        return Receipt(WhatsAppCloud.name, wamid, message_status, read=name == "read")
    code, error = None, "WhatsApp: failed"
    errors = status.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        code = first.get("code")
        code = str(code) if isinstance(code, int) and not isinstance(code, bool) else code  # Meta's are numbers
        code = optional_identifier(code, "status.errors.code", MAX_CODE_LENGTH)
        data = first.get("error_data")
        details = free_text(data.get("details")) if isinstance(data, dict) else None
        title = free_text(first.get("title")) or free_text(first.get("message")) or "failed"
        error = f"WhatsApp {code}: {title}" + (f" ({details})" if details else "")
    return Receipt(
        WhatsAppCloud.name,
        wamid,
        message_status,
        error_code=code,
        error=error[:MAX_TEXT_LENGTH],
        error_class=receipt_error_class(code),
    )


def _items(payload: object, key: str) -> list[object]:
    """Every item under `value.<key>` of a webhook post, whatever else it holds (tolerant of missing parts)."""
    found: list[object] = []
    entries = payload.get("entry") if isinstance(payload, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            items = value.get(key) if isinstance(value, dict) else None
            found.extend(items if isinstance(items, list) else [])
    return found


def statuses(payload: object) -> list[object]:
    """Every status of a webhook post (delivery receipts), each read by `receipt_from_status`."""
    return _items(payload, "statuses")


def messages(payload: object) -> list[object]:
    """Every message customers sent in a webhook post, each read by `inbound_text`."""
    return _items(payload, "messages")


def inbound_text(message: object) -> tuple[str, str] | None:
    """`(from, text)` of a text message a customer sent us (`from` is the number without `+`), or None for
    another type (an image, a button, ...), which carries no keyword. A message that cannot be read (not
    an object; a `text` that is not an object; a `from` or `text.body` that is not a string) raises
    `BadItem`."""
    if not isinstance(message, dict):
        raise BadItem("message", "type")
    text = message.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise BadItem("message.text", "type")
    sender, body = message.get("from"), text.get("body")
    for field, value in (("message.from", sender), ("message.text.body", body)):
        if value is None:
            raise BadItem(field, "missing")
        if not isinstance(value, str):
            raise BadItem(field, "type")
    return sender, body
