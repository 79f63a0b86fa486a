"""Per-API-key rate limiting of the whole API (Flask-Limiter, counted in Redis).

One budget of `API_RATE_LIMIT` per API key across all endpoints; a request without a valid key
counts against its client address. Over the budget: 429 in the one error shape, with `Retry-After`.
The public endpoints (health, OpenAPI document, docs) are not limited. With Redis down or stalled,
the budget is counted in the process's memory.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter
from sqlalchemy.exc import SQLAlchemyError

from app.auth import PUBLIC_ENDPOINTS, current_owner
from app.queues import redis_options


def _rate_limit_key() -> str:
    """The owner of the request's API key; the client's address for a request without a valid key, or
    whose key cannot be looked up (the database is unavailable: the key check answers 503 next)."""
    try:
        owner = current_owner()
    except SQLAlchemyError:
        owner = None
    return owner or f"ip:{request.remote_addr}"


def _api_rate_limit() -> ApplicationLimit:
    """One budget per API key across the whole API, read from the app's config on each request."""
    return ApplicationLimit(
        limit_provider=lambda: current_app.config["API_RATE_LIMIT"],
        key_function=_rate_limit_key,
        error_message="rate limit exceeded for this API key; retry after the Retry-After seconds",
    )


limiter = Limiter(
    _rate_limit_key,
    application_limits=[_api_rate_limit()],
    headers_enabled=True,
    # Redis down: the same budget, counted in this process's memory; Redis is looked for again only
    # now and then (1, 2, 4 ... 32 s apart), so that an outage does not add a Redis wait to every request.
    in_memory_fallback=[_api_rate_limit()],
    swallow_errors=True,  # and should even that fail: serve unlimited rather than fail every request
    strategy="fixed-window",
)


@limiter.request_filter
def _is_public() -> bool:
    return request.endpoint in PUBLIC_ENDPOINTS


def _note_own_retry_after(response: Response) -> Response:
    g.own_retry_after = response.headers.get("Retry-After")  # a 503's, before the limiter replaces it
    return response


def _retry_after_only_when_limited(response: Response) -> Response:
    # Flask-Limiter adds Retry-After to every response; its value means something only on a 429. Another
    # answer keeps the Retry-After it set itself, if any.
    if response.status_code != 429:
        own = g.pop("own_retry_after", None)
        if own is None:
            response.headers.pop("Retry-After", None)
        else:
            response.headers["Retry-After"] = own
    return response


def init_app(app: Flask) -> None:
    # Flask runs after_request hooks in reverse order of registration: the limiter's runs between these two.
    app.after_request(_retry_after_only_when_limited)
    # The limiter's own Redis connection fails as fast as the app's.
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", redis_options(app.config))
    limiter.init_app(app)
    app.after_request(_note_own_retry_after)
