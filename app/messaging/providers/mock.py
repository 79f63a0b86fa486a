"""The mock provider: the default, for development and tests. It takes every message unless told
otherwise (`MOCK_SENDER_*` settings) and can log each attempt."""

from __future__ import annotations

import json
import os
import random
import threading
import time

from flask import Flask

from app.messaging.providers.base import OutgoingMessage, SendResult
from app.models import ErrorClass


class MockProvider:
    """Succeeds unless told otherwise: `fail_attempts` fails the first N attempts of every message,
        `failure_rate` fails attempts at random (transient failures, so RQ retries them), `latency` seconds
        stand for the provider's round trip. With `log_path`, appends one JSON line per attempt, when it ends
    (with the time it started)."""

    name = "mock"
    _log_lock = threading.Lock()

    def __init__(
        self, failure_rate: float = 0.0, fail_attempts: int = 0, log_path: str | None = None, latency: float = 0.0
    ):
        self.latency = latency
        self.failure_rate = failure_rate
        self.fail_attempts = fail_attempts
        self.log_path = log_path

    @classmethod
    def from_config(cls, app: Flask) -> MockProvider:
        return cls(
            failure_rate=app.config["MOCK_SENDER_FAILURE_RATE"],
            fail_attempts=app.config["MOCK_SENDER_FAIL_ATTEMPTS"],
            log_path=app.config["MOCK_SENDER_LOG"],
            latency=app.config["MOCK_SENDER_LATENCY"],
        )

    def send(self, message: OutgoingMessage) -> SendResult:
        started = time.time()
        if self.latency:
            time.sleep(self.latency)  # a provider's round trip
        if message.attempt <= self.fail_attempts:
            error = f"mock failure: attempt {message.attempt} of {self.fail_attempts} set to fail"
            result = SendResult.refused(ErrorClass.TRANSIENT, error, "mock")
        elif self.failure_rate and random.random() < self.failure_rate:
            result = SendResult.refused(ErrorClass.TRANSIENT, "mock failure: random", "mock")
        else:
            result = SendResult.accepted(f"mock-{message.message_id}")
        if self.log_path:
            self._log(message, result, started)
        return result

    def _log(self, message: OutgoingMessage, result: SendResult, started: float) -> None:
        line = json.dumps(
            {
                "message_id": message.message_id,
                "campaign_id": message.campaign_id,
                "channel": message.channel,
                "phone": message.phone,
                "body": message.body,
                "template": None if message.template is None else vars(message.template),
                "ok": result.ok,
                "attempt": message.attempt,
                "idempotency_key": message.idempotency_key,
                "started": started,  # when the request reached the provider (Unix time)
            }
        )
        # One write of a whole line with O_APPEND: lines from several processes do not interleave.
        with self._log_lock:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
