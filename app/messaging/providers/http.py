"""The one pooled HTTP client a process uses to reach providers, and what a failed request means."""

from __future__ import annotations

import email.utils
import time
from contextvars import ContextVar

import httpx
from flask import Flask

from app.messaging.providers.base import SendResult
from app.models import ErrorClass


def http_client(app: Flask) -> httpx.Client:
    """The process's client: keep-alive connections (`PROVIDER_MAX_CONNECTIONS` per provider host), the
    connect and read timeouts of the settings. Thread-safe; built once per process."""
    client = app.extensions.get("provider_http")
    if client is None:
        config = app.config
        client = httpx.Client(
            timeout=httpx.Timeout(
                connect=config["PROVIDER_CONNECT_TIMEOUT"],
                read=config["PROVIDER_READ_TIMEOUT"],
                write=config["PROVIDER_READ_TIMEOUT"],
                pool=config["PROVIDER_CONNECT_TIMEOUT"],
            ),
            limits=httpx.Limits(
                max_connections=config["PROVIDER_MAX_CONNECTIONS"],
                max_keepalive_connections=config["PROVIDER_MAX_CONNECTIONS"],
            ),
            headers={"User-Agent": "campaign-dispatch"},
        )
        app.extensions["provider_http"] = client
    return client


# The latest `time.monotonic()` at which this thread's next request may leave, set by the throughput limit
# (`app.messaging.send.throttle`) when it grants a slot; None: no limit.
send_by: ContextVar[float | None] = ContextVar("send_by", default=None)
# The error code of a request not made because it was late for its slot.
LATE_FOR_SLOT = "late_for_slot"
# The error code of a request that went out and got no answer.
UNKNOWN_CODE = "no_answer"


def post(client: httpx.Client, url: str, **kwargs) -> httpx.Response | SendResult:
    """POST, or the refusal that a request which got no answer is: `transient` when it never reached the
    provider (no connection), `unknown` when it went out and no answer came (a timeout, a connection dropped
    mid-way): the provider may have taken it, and a retry could deliver twice (docs/providers.md).

    A request that would leave later than its slot at the provider allows (`send_by`: the thread was held
    up, by a busy CPU say) is not made: it could crowd the next window at the provider. The send takes a
    new slot instead (`LATE_FOR_SLOT`)."""
    deadline = send_by.get()
    if deadline is not None:
        send_by.set(None)  # one request per slot
        if time.monotonic() > deadline:
            return SendResult.refused(ErrorClass.THROTTLED, "late for its slot at the provider", LATE_FOR_SLOT)
    try:
        return client.post(url, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # The request never left: trying again cannot deliver twice.
        return SendResult.refused(ErrorClass.TRANSIENT, f"could not connect: {type(exc).__name__}", "connect")
    except (httpx.TimeoutException, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
        # The request went out (or may have), and no answer came: the provider may have taken it.
        return SendResult.refused(
            ErrorClass.UNKNOWN, f"no answer ({type(exc).__name__}): the provider may have taken it", UNKNOWN_CODE
        )
    except httpx.HTTPError as exc:
        return SendResult.refused(ErrorClass.TRANSIENT, f"HTTP error: {type(exc).__name__}: {exc}", "http")


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds (a number, or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def json_or_none(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def unexpected(response: httpx.Response, provider: str) -> SendResult:
    """A status the provider's classification did not cover: 5xx and 429 are worth another try, the rest
    is this service's request being refused (permanent)."""
    if response.status_code == 429:
        return SendResult.refused(ErrorClass.THROTTLED, f"{provider}: HTTP 429", 429, retry_after(response))
    error_class = ErrorClass.TRANSIENT if response.status_code >= 500 else ErrorClass.PERMANENT
    return SendResult.refused(
        error_class, f"{provider}: HTTP {response.status_code}: {response.text[:300]}", response.status_code
    )
