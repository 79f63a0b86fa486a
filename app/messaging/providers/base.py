"""What every provider takes and answers: the message to send, and the result of one attempt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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
