"""Providers deliver one rendered message: Africa's Talking and Twilio for SMS, the WhatsApp Cloud API for
WhatsApp, and a mock for development and tests (the default). A campaign's channel picks the provider
(`SMS_PROVIDER`, `WHATSAPP_PROVIDER`); each process builds each provider once, on one pooled HTTP client.

A provider answers every attempt with a `SendResult`: accepted with the provider's message id, or refused
with the error's class (`ErrorClass`), the provider's code and its words. It raises only on a bug of its
own: a network failure or a timeout is a transient refusal.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Flask

from app.messaging.providers import africastalking, mock, twilio, whatsapp_cloud
from app.messaging.providers.base import OutgoingMessage, Provider, SendResult, WhatsAppTemplate
from app.messaging.providers.http import http_client
from app.models import Channel


def build_provider(app: Flask, name: str) -> Provider:
    """The provider `name`, configured from the app's settings (validated at start)."""
    builders = {
        "mock": mock.MockProvider.from_config,
        "africastalking": africastalking.AfricasTalking.from_config,
        "twilio": twilio.Twilio.from_config,
        "whatsapp_cloud": whatsapp_cloud.WhatsAppCloud.from_config,
    }
    return builders[name](app)


def provider_name(app: Flask, channel: str) -> str:
    return app.config["WHATSAPP_PROVIDER"] if channel == Channel.WHATSAPP else app.config["SMS_PROVIDER"]


def get_provider(app: Flask, channel: str) -> Provider:
    """The provider of `channel`, built once per process."""
    providers = app.extensions.setdefault("providers", {})
    name = provider_name(app, channel)
    if name not in providers:
        providers[name] = build_provider(app, name)
        http_client(app)  # built here, not inside the first send: nothing slow between a send's slot and its request
    return providers[name]


# Per provider: the failed receipts' codes that opt the recipient out of the channel here, and those that
# hold the message to be tried again after a while (WhatsApp's 131050 and 131049; none for the SMS providers).
_RECEIPT_OPTS_OUT = {whatsapp_cloud.WhatsAppCloud.name: whatsapp_cloud.RECEIPT_OPTS_OUT}
_RECEIPT_HOLDS = {whatsapp_cloud.WhatsAppCloud.name: whatsapp_cloud.RECEIPT_HOLDS}


def receipt_opts_out(provider: str, error_code: str | None) -> bool:
    """Whether a failed receipt of `provider` with `error_code` says its recipient opted out with it."""
    return error_code is not None and error_code in _RECEIPT_OPTS_OUT.get(provider, ())


def receipt_hold(provider: str, error_code: str | None) -> timedelta | None:
    """How long a failed receipt of `provider` with `error_code` holds its message before it is tried again,
    or None for a failure that holds nothing."""
    return _RECEIPT_HOLDS.get(provider, {}).get(error_code) if error_code is not None else None


__all__ = ["OutgoingMessage", "Provider", "SendResult", "WhatsAppTemplate", "get_provider"]
