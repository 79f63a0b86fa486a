"""Senders deliver one rendered message to a provider. The mock sender stands in for SMS and
WhatsApp providers in development and tests."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from flask import Flask


@dataclass(frozen=True)
class OutgoingMessage:
    message_id: int
    campaign_id: int
    channel: str
    phone: str
    body: str
    attempt: int  # 1 for the first attempt of this message

    @property
    def idempotency_key(self) -> str:
        """What a provider uses to drop a repeat of the same message (a retry after a lost answer)."""
        return f"outbound-message-{self.message_id}"


@dataclass(frozen=True)
class SendResult:
    ok: bool
    error: str | None = None


class Sender(Protocol):
    def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver `message`; a provider refusal is a failed `SendResult`, not an exception."""
        ...


class MockSender:
    """Succeeds unless told otherwise: `fail_attempts` fails the first N attempts of every message,
    `failure_rate` fails attempts at random, `latency` seconds stand for the provider's round trip.
    With `log_path`, appends one JSON line per attempt."""

    _log_lock = threading.Lock()

    def __init__(
        self, failure_rate: float = 0.0, fail_attempts: int = 0, log_path: str | None = None, latency: float = 0.0
    ):
        self.latency = latency
        self.failure_rate = failure_rate
        self.fail_attempts = fail_attempts
        self.log_path = log_path

    def send(self, message: OutgoingMessage) -> SendResult:
        if self.latency:
            time.sleep(self.latency)  # a provider's round trip
        if message.attempt <= self.fail_attempts:
            result = SendResult(False, f"mock failure: attempt {message.attempt} of {self.fail_attempts} set to fail")
        elif self.failure_rate and random.random() < self.failure_rate:
            result = SendResult(False, "mock failure: random")
        else:
            result = SendResult(True)
        if self.log_path:
            self._log(message, result)
        return result

    def _log(self, message: OutgoingMessage, result: SendResult) -> None:
        line = json.dumps(
            {
                "message_id": message.message_id,
                "campaign_id": message.campaign_id,
                "phone": message.phone,
                "body": message.body,
                "ok": result.ok,
                "attempt": message.attempt,
                "idempotency_key": message.idempotency_key,
            }
        )
        # One write of a whole line with O_APPEND: lines from several processes do not interleave.
        with self._log_lock:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)


def build_sender(app: Flask) -> Sender:
    """The sender named by `SENDER` in the app's config."""
    name = app.config["SENDER"]
    if name == "mock":
        return MockSender(
            failure_rate=app.config["MOCK_SENDER_FAILURE_RATE"],
            fail_attempts=app.config["MOCK_SENDER_FAIL_ATTEMPTS"],
            log_path=app.config["MOCK_SENDER_LOG"],
            latency=app.config["MOCK_SENDER_LATENCY"],
        )
    raise ValueError(f"unknown SENDER {name!r}; this build ships the 'mock' sender")


def get_sender(app: Flask) -> Sender:
    """The app's sender, built once per process."""
    if "sender" not in app.extensions:
        app.extensions["sender"] = build_sender(app)
    return app.extensions["sender"]
