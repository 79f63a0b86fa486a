"""Africa's Talking SMS: `POST {base}/version1/messaging` (form `username`, `to`, `message`, optional `from`;
header `apiKey`). The answer's `SMSMessageData.Recipients[0]` says whether the message was taken:
`statusCode` 100 (Processed), 101 (Sent) and 102 (Queued) are; the rest are refusals, classified below
(docs.africastalking.com/sms/sending). Delivery reports come to `/webhooks/africastalking/delivery`.
"""

from __future__ import annotations

from collections.abc import Mapping

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
from app.messaging.providers.http import http_client, json_or_none, post, unexpected
from app.models import ErrorClass, MessageStatus

DEFAULT_BASE_URL = "https://api.africastalking.com"
SANDBOX_BASE_URL = "https://api.sandbox.africastalking.com"
ACCEPTED = {100, 101, 102}
# statusCode -> class. Anything else (and an HTTP 5xx) is transient.
CLASSES = {
    401: ErrorClass.ACCOUNT,  # RiskHold: the account is held for review
    402: ErrorClass.ACCOUNT,  # InvalidSenderId
    403: ErrorClass.PERMANENT,  # InvalidPhoneNumber
    404: ErrorClass.PERMANENT,  # UnsupportedNumberType
    405: ErrorClass.ACCOUNT,  # InsufficientBalance
    406: ErrorClass.PERMANENT,  # UserInBlacklist
    407: ErrorClass.PERMANENT,  # CouldNotRoute
    409: ErrorClass.PERMANENT,  # DoNotDisturbRejection
    500: ErrorClass.TRANSIENT,  # InternalServerError
    501: ErrorClass.TRANSIENT,  # GatewayError
    502: ErrorClass.TRANSIENT,  # RejectedByGateway
}
# The same refusals by name, for an answer that has no recipient to say it (a bad `from`, a bad number).
CLASSES_BY_NAME = {
    "RiskHold": ErrorClass.ACCOUNT,
    "InvalidSenderId": ErrorClass.ACCOUNT,
    "InvalidPhoneNumber": ErrorClass.PERMANENT,
    "UnsupportedNumberType": ErrorClass.PERMANENT,
    "InsufficientBalance": ErrorClass.ACCOUNT,
    "UserInBlacklist": ErrorClass.PERMANENT,
    "CouldNotRoute": ErrorClass.PERMANENT,
    "DoNotDisturbRejection": ErrorClass.PERMANENT,
}


class AfricasTalking:
    name = "africastalking"

    def __init__(self, app: Flask, username: str, api_key: str, sender_id: str | None, base_url: str):
        self.app = app
        self.username = username
        self.api_key = api_key
        self.sender_id = sender_id
        self.url = f"{base_url}/version1/messaging"

    @classmethod
    def from_config(cls, app: Flask) -> AfricasTalking:
        config = app.config
        username = config["AFRICASTALKING_USERNAME"]
        default = SANDBOX_BASE_URL if username == "sandbox" else DEFAULT_BASE_URL
        return cls(
            app,
            username,
            api_key=config["AFRICASTALKING_API_KEY"],
            sender_id=config["AFRICASTALKING_SENDER_ID"],
            base_url=config["AFRICASTALKING_BASE_URL"] or default,
        )

    def send(self, message: OutgoingMessage) -> SendResult:
        form = {"username": self.username, "to": message.phone, "message": message.body}
        if self.sender_id:
            form["from"] = self.sender_id
        headers = {"apiKey": self.api_key, "Accept": "application/json"}
        response = post(http_client(self.app), self.url, data=form, headers=headers)
        if isinstance(response, SendResult):
            return response
        if response.status_code == 401:
            error = "Africa's Talking: authentication failed (check the username and API key)"
            return SendResult.refused(ErrorClass.ACCOUNT, error, 401)
        body = json_or_none(response)
        if body is None or not isinstance(body.get("SMSMessageData"), dict):
            return unexpected(response, "Africa's Talking")
        # Refusals come with 201, or another status (409 for DoNotDisturbRejection): the recipient says.
        return _result(body["SMSMessageData"])


def _result(data: dict) -> SendResult:
    recipients = data.get("Recipients") or []
    if not recipients:  # refused as a whole: the message says why
        reason = str(data.get("Message") or "no recipient in the answer")
        return SendResult.refused(
            CLASSES_BY_NAME.get(reason, ErrorClass.PERMANENT), f"Africa's Talking: {reason}", reason
        )
    recipient = recipients[0]
    code = recipient.get("statusCode")
    if code in ACCEPTED:
        message_id = recipient.get("messageId")
        return SendResult.accepted(None if message_id in (None, "None") else str(message_id))
    status = recipient.get("status") or "unknown"
    return SendResult.refused(CLASSES.get(code, ErrorClass.TRANSIENT), f"Africa's Talking: {status}", code)


# A failed or rejected report's `failureReason` -> permanent: the subscriber can never receive it, so
# retry-failed does not send it again. Any other reason (InsufficientCredit, DeliveryFailure,
# AbsentSubscriber, UserIsInactive, ...) is transient.
RECEIPT_PERMANENT = {
    "UserInBlackList",  # the subscriber blacklisted the sender
    "UserInBlacklist",
    "DoNotDisturbRejection",  # the subscriber's do-not-disturb setting
    "UserDoesNotExist",
    "NotNetworkSubscriber",
    "UserNotSubscribedToProduct",
    "InvalidPhoneNumber",
}


def receipt_error_class(reason: str | None) -> str:
    """The class of a failed or rejected report's `failureReason`."""
    return ErrorClass.PERMANENT if reason in RECEIPT_PERMANENT else ErrorClass.TRANSIENT


# Delivery report `status` -> the message status it means; Sent, Submitted and Buffered change nothing.
RECEIPT_STATUSES = {
    "Success": MessageStatus.DELIVERED,
    "Failed": MessageStatus.UNDELIVERED,
    "Rejected": MessageStatus.UNDELIVERED,
}


def receipt_from_form(form: Mapping[str, str]) -> Receipt | None:
    """The delivery report Africa's Talking posts (form `id`, `status`, `failureReason`, ...), or None for a
    status that changes nothing. A report that cannot be read (no `id`, an `id` or `failureReason` longer
    than its column or not printable text) raises `BadItem`."""
    status = RECEIPT_STATUSES.get(form.get("status", ""))
    if status is None:
        return None
    message_id = identifier(form.get("id"), "id", MAX_ID_LENGTH)
    if status == MessageStatus.DELIVERED:
        return Receipt(AfricasTalking.name, message_id, status)
    reason = optional_identifier(form.get("failureReason"), "failureReason", MAX_CODE_LENGTH)
    return Receipt(
        AfricasTalking.name,
        message_id,
        status,
        error_code=reason,
        error=f"Africa's Talking: {form['status']}" + (f": {reason}" if reason else ""),
        error_class=receipt_error_class(reason),
    )
