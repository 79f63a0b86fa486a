"""Twilio SMS: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json` (basic auth with the account SID and
auth token; form `To`, `From` or `MessagingServiceSid`, `Body`, `StatusCallback`). A 201 answer's `sid`
(`SM...`) is the message's id; an error answer's `code` is classified below (twilio.com/docs/api/errors).
Status callbacks come to `/webhooks/twilio/status`, signed with the auth token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import replace

from flask import Flask

from app.messaging.providers.base import (
    MAX_CODE_LENGTH,
    MAX_ID_LENGTH,
    OutgoingMessage,
    Receipt,
    SendResult,
    identifier,
    optional_identifier,
)
from app.messaging.providers.http import http_client, json_or_none, post, retry_after, unexpected
from app.models import ErrorClass, MessageStatus

STATUS_CALLBACK_PATH = "/webhooks/twilio/status"
# The refusal of a recipient who replied STOP to the sender (Twilio keeps its own opt-out list).
OPTED_OUT = 21610
# code -> class. Other 4xx codes are permanent (the request itself is refused), 5xx transient.
CLASSES = {
    21211: ErrorClass.PERMANENT,  # invalid `To`
    21610: ErrorClass.PERMANENT,  # the recipient replied STOP: also opts the customer out (OPTED_OUT)
    21614: ErrorClass.PERMANENT,  # `To` is not a mobile number
    21612: ErrorClass.PERMANENT,  # cannot route to this number
    21408: ErrorClass.PERMANENT,  # region not enabled for this number
    20003: ErrorClass.ACCOUNT,  # authentication failed
    20404: ErrorClass.ACCOUNT,  # the account or service was not found
    21606: ErrorClass.ACCOUNT,  # `From` is not a valid number of the account
    21608: ErrorClass.ACCOUNT,  # trial account: unverified number
    21609: ErrorClass.ACCOUNT,  # invalid StatusCallback
    30002: ErrorClass.ACCOUNT,  # account suspended
    20429: ErrorClass.THROTTLED,  # too many concurrent requests
    20500: ErrorClass.TRANSIENT,  # internal error
    20503: ErrorClass.TRANSIENT,  # service unavailable
}


class Twilio:
    name = "twilio"

    def __init__(
        self,
        app: Flask,
        account_sid: str,
        auth_token: str,
        sender: dict[str, str],
        base_url: str,
        status_callback: str | None,
    ):
        self.app = app
        self.auth = (account_sid, auth_token)
        self.sender = sender
        self.url = f"{base_url}/2010-04-01/Accounts/{account_sid}/Messages.json"
        self.status_callback = status_callback

    @classmethod
    def from_config(cls, app: Flask) -> Twilio:
        config = app.config
        service = config["TWILIO_MESSAGING_SERVICE_SID"]
        sender = {"MessagingServiceSid": service} if service else {"From": config["TWILIO_FROM"]}
        public = config["PUBLIC_BASE_URL"]
        return cls(
            app,
            config["TWILIO_ACCOUNT_SID"],
            config["TWILIO_AUTH_TOKEN"],
            sender,
            config["TWILIO_BASE_URL"],
            status_callback=public + STATUS_CALLBACK_PATH if public else None,
        )

    def send(self, message: OutgoingMessage) -> SendResult:
        form = {"To": message.phone, "Body": message.body, **self.sender}
        if self.status_callback:
            form["StatusCallback"] = self.status_callback
        response = post(http_client(self.app), self.url, data=form, auth=self.auth)
        if isinstance(response, SendResult):
            return response
        body = json_or_none(response) or {}
        if response.status_code in (200, 201) and body.get("sid"):
            return SendResult.accepted(str(body["sid"]))
        code = body.get("code")
        if not isinstance(code, int):
            return unexpected(response, "Twilio")
        if response.status_code == 429 or code == 20429:
            error_class = ErrorClass.THROTTLED
        else:
            default = ErrorClass.TRANSIENT if response.status_code >= 500 else ErrorClass.PERMANENT
            error_class = CLASSES.get(code, default)
        error = f"Twilio {code}: {body.get('message') or response.reason_phrase}"
        result = SendResult.refused(error_class, error, code, retry_after(response))
        return replace(result, recipient_opted_out=True) if code == OPTED_OUT else result


# A failed or undelivered receipt's `ErrorCode` -> permanent: the number can never receive it, so
# retry-failed does not send it again. Any other code (30003 handset off or out of coverage, 30001 queue
# overflow, 30008 unknown, ...) is transient.
RECEIPT_PERMANENT = {
    "30004",  # message blocked: the recipient blocked the sender
    "30005",  # unknown destination handset: the number does not exist
    "30006",  # landline or unreachable carrier
    "30007",  # carrier violation: filtered as spam, and would be again
    "21610",  # the recipient replied STOP
    "21211",  # invalid `To`
    "21614",  # `To` is not a mobile number
}


def receipt_error_class(code: str | None) -> str:
    """The class of a failed or undelivered receipt's `ErrorCode`."""
    return ErrorClass.PERMANENT if code in RECEIPT_PERMANENT else ErrorClass.TRANSIENT


# Status callback `MessageStatus` -> the message status it means (`read` is delivered, and read); queued,
# sending, sent, accepted and scheduled change nothing.
RECEIPT_STATUSES = {
    "delivered": MessageStatus.DELIVERED,
    "read": MessageStatus.DELIVERED,
    "undelivered": MessageStatus.UNDELIVERED,
    "failed": MessageStatus.FAILED,
}


def signature(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """Twilio's `X-Twilio-Signature`: Base64 of HMAC-SHA1, keyed with the auth token, of the full URL
    followed by each POST parameter's name and value, sorted by name (twilio.com/docs/usage/security)."""
    payload = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def receipt_from_form(form: Mapping[str, str]) -> Receipt | None:
    """The status callback Twilio posts (form `MessageSid`, `MessageStatus`, `ErrorCode`, ...), or None for
    a status that changes nothing. Twilio adds parameters without notice: the others are ignored. A callback
    that cannot be read (no `MessageSid`, a `MessageSid` or a failure's `ErrorCode` longer than its column or
    not printable text) raises `BadItem`."""
    twilio_status = form.get("MessageStatus", "")
    status = RECEIPT_STATUSES.get(twilio_status)
    if status is None:
        return None
    sid = identifier(form.get("MessageSid"), "MessageSid", MAX_ID_LENGTH)
    if status == MessageStatus.DELIVERED:
        return Receipt(Twilio.name, sid, status, read=twilio_status == "read")
    code = optional_identifier(form.get("ErrorCode"), "ErrorCode", MAX_CODE_LENGTH)
    return Receipt(
        Twilio.name,
        sid,
        status,
        error_code=code,
        error=f"Twilio: {twilio_status}" + (f" ({code})" if code else ""),
        error_class=receipt_error_class(code),
    )
