"""Per-API-key rate limiting of the whole API (Flask-Limiter, counted in Redis).

One budget of `API_RATE_LIMIT` per API key across all endpoints; a request without a valid key
counts against its client address. Over the budget: 429 in the one error shape, with `Retry-After`.
The public endpoints (health, OpenAPI document, docs) are not limited. With Redis down or stalled,
the budget is counted in the process's memory (see `app.extensions.limiter`).
"""

from __future__ import annotations

from flask import Flask, Response, g, request

from app.auth import PUBLIC_ENDPOINTS
from app.extensions import limiter, redis_options


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
