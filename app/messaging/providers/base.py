"""What every provider takes and answers: the message to send, and the result of one attempt; and how the
items of their webhook posts are read, each on its own."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Protocol

from app.text import BIDI_CONTROLS


@dataclass(frozen=True)
class WhatsAppTemplate:
    """An approved WhatsApp template and its body parameters, in order."""

    name: str
    language: str
    parameters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutgoingMessage:
    message_id: int
    campaign_id: int
    channel: str
    phone: str  # E.164
    body: str
    attempt: int  # 1 for the first attempt of this message
    template: WhatsAppTemplate | None = None  # WhatsApp only: send this template instead of text

    @property
    def idempotency_key(self) -> str:
        """What a provider could use to drop a repeat of the same message (none of ours offers it)."""
        return f"outbound-message-{self.message_id}"


@dataclass(frozen=True)
class SendResult:
    """A provider's answer to one attempt."""

    ok: bool
    provider_message_id: str | None = None
    error_class: str | None = None
    error_code: str | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds the provider asked to wait (throttled)
    # The provider refused because the recipient opted out with it (Twilio 21610: they replied STOP):
    # the customer is opted out of the channel here too, so that no campaign tries again.
    recipient_opted_out: bool = False

    @classmethod
    def accepted(cls, provider_message_id: str | None) -> SendResult:
        return cls(True, provider_message_id=provider_message_id)

    @classmethod
    def refused(cls, error_class: str, error: str, code: object = None, retry_after: float | None = None) -> SendResult:
        return cls(
            False,
            error_class=error_class,
            error_code=None if code is None else str(code)[:64],
            error=error[:1000],
            retry_after=retry_after,
        )


class Provider(Protocol):
    name: str  # stored on each message it takes; receipts find the message by (name, provider id)

    def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver `message`; a refusal is a `SendResult`, not an exception."""
        ...


# --- what a provider's webhook posts: each item read on its own -----------------------------------------

# How long an id and a code may be: their columns (a longer one can name no message, and cannot be kept).
MAX_ID_LENGTH = 128  # outbound_messages.provider_message_id, delivery_receipts.provider_message_id
MAX_CODE_LENGTH = 64  # outbound_messages.error_code, delivery_receipts.error_code
# What a provider's words for people (an error's title) are cut to, as a send's error is.
MAX_TEXT_LENGTH = 1000


class BadItem(ValueError):
    """One item of a webhook post (a receipt, a customer's message) that cannot be read; the rest of the post
    can. `field` names the part at fault, `reason` says why: `missing`, `type` (not the JSON type it must
    be), `too_long` (longer than its column) or `characters` (NUL or another control character, a lone
    surrogate)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def identifier(value: object, field: str, limit: int) -> str:
    """`value` as a provider's id or code: a string of 1 to `limit` printable characters. Anything else is a
    `BadItem` naming `field`."""
    if value is None or value == "":
        raise BadItem(field, "missing")
    if not isinstance(value, str):
        raise BadItem(field, "type")
    if len(value) > limit:
        raise BadItem(field, "too_long")
    if not value.isprintable():
        raise BadItem(field, "characters")
    return value


def optional_identifier(value: object, field: str, limit: int) -> str | None:
    """`identifier`, or None for an absent or empty value."""
    return None if value is None or value == "" else identifier(value, field, limit)


def free_text(value: object) -> str | None:
    """Words a provider wrote for people (an error's title or details), as the service stores text: None
    unless a string; control characters, bidirectional overrides and lone surrogates dropped (`app.text`);
    cut to `MAX_TEXT_LENGTH`."""
    if not isinstance(value, str):
        return None
    kept = "".join(c for c in value if unicodedata.category(c) not in ("Cc", "Cs") and c not in BIDI_CONTROLS)
    return kept[:MAX_TEXT_LENGTH] or None


@dataclass(frozen=True)
class Receipt:
    """One receipt, in the service's terms: the message status it means (`read` is `delivered` plus read)."""

    provider: str
    provider_message_id: str
    status: str
    read: bool = False
    error_code: str | None = None
    error: str | None = None
    error_class: str | None = None  # a failure's class from its code (providers' `receipt_error_class`)
