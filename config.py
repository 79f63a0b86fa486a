"""Configuration from the environment (and a `.env` file), with safe defaults.

Every setting is listed in the README. `Config` is read once, when the module is imported;
tests build their own subclass or pass overrides to `create_app`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent
load_dotenv(BASE_DIR / ".env")


def database_url(raw: str | None) -> str:
    """The SQLAlchemy URL for `raw`: PostgreSQL through psycopg 3 (Heroku's `postgres://` accepted),
    a SQLite file in `instance/` when unset."""
    if not raw:
        return f"sqlite:///{BASE_DIR / 'instance' / 'campaigns.db'}"
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix) :]
    return raw


def int_list(raw: str) -> list[int]:
    """`"10,30,60"` -> `[10, 30, 60]`; blanks are ignored."""
    return [int(part) for part in raw.split(",") if part.strip()]


def str_list(raw: str) -> list[str]:
    """`"a, b,"` -> `["a", "b"]`."""
    return [part.strip() for part in raw.split(",") if part.strip()]


def limits_storage_uri(redis_url: str) -> str:
    """Flask-Limiter's name for the same Redis (it spells a unix socket `redis+unix://`)."""
    return "redis+" + redis_url if redis_url.startswith("unix://") else redis_url


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class Config:
    SQLALCHEMY_DATABASE_URI = database_url(os.environ.get("DATABASE_URL"))
    SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}
    # Time limits on PostgreSQL (docs/operations.md, "When PostgreSQL is down or hung"), in seconds; 0 turns
    # one off. The statement timeout, and the client's deadline on each round trip just above it, apply to
    # the web, worker and scheduler processes; other Flask CLI commands (migrations, imports) run without.
    DATABASE_CONNECT_TIMEOUT = _int("DATABASE_CONNECT_TIMEOUT", 3)
    DATABASE_STATEMENT_TIMEOUT = _float("DATABASE_STATEMENT_TIMEOUT", 5)
    # The audience send's one INSERT ... SELECT (about 9 s per million recipients) gets its own budget.
    SEND_STATEMENT_TIMEOUT = _float("SEND_STATEMENT_TIMEOUT", 120)
    # What a 503 for an unavailable database tells the client to wait (Retry-After).
    DATABASE_RETRY_AFTER = _int("DATABASE_RETRY_AFTER", 5)
    REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

    # Send jobs, one per message, go to SEND_QUEUE. Campaign-level jobs (fan-out, scheduled dispatch,
    # reconcile) go to CONTROL_QUEUE, which workers take first, so they never wait behind a million sends.
    SEND_QUEUE = os.environ.get("SEND_QUEUE", "campaign_sends")
    CONTROL_QUEUE = os.environ.get("CONTROL_QUEUE", "campaign_control")
    # Queues this worker process listens on, in priority order.
    QUEUES = str_list(os.environ.get("QUEUES", f"{CONTROL_QUEUE},{SEND_QUEUE}"))
    MAX_RETRIES = 3
    RETRY_INTERVALS = int_list(os.environ.get("RETRY_INTERVALS", "10,30,60"))
    JOB_TIMEOUT = _int("JOB_TIMEOUT", 60)
    JOB_RESULT_TTL = _int("JOB_RESULT_TTL", 10)
    # How long a send job keeps trying to record an attempt while the database is unavailable, before it
    # gives the message up to the reconciler (at most half of JOB_TIMEOUT is used).
    RECORD_RETRY_WINDOW = _float("RECORD_RETRY_WINDOW", 20)
    ENQUEUE_BATCH_SIZE = _int("ENQUEUE_BATCH_SIZE", 1000)
    # A /send that creates more rows than this enqueues them from a background fan-out job.
    ENQUEUE_INLINE_LIMIT = _int("ENQUEUE_INLINE_LIMIT", 1000)

    MAX_SEND_IDS = _int("MAX_SEND_IDS", 10_000)
    IMPORT_BATCH_SIZE = _int("IMPORT_BATCH_SIZE", 1000)
    # Imports may be larger than other requests.
    IMPORT_MAX_CONTENT_LENGTH = _int("IMPORT_MAX_CONTENT_LENGTH", 200 * 1024 * 1024)
    DEFAULT_PHONE_REGION = os.environ.get("DEFAULT_PHONE_REGION", "KE")

    SENDER = os.environ.get("SENDER", "mock")
    MOCK_SENDER_FAILURE_RATE = _float("MOCK_SENDER_FAILURE_RATE", 0.0)
    MOCK_SENDER_FAIL_ATTEMPTS = _int("MOCK_SENDER_FAIL_ATTEMPTS", 0)
    MOCK_SENDER_LATENCY = _float("MOCK_SENDER_LATENCY", 0.0)
    MOCK_SENDER_LOG = os.environ.get("MOCK_SENDER_LOG") or None

    # Scheduling and self-healing (see README, "Processes").
    SCHEDULER_INTERVAL = _float("SCHEDULER_INTERVAL", 5)
    RECONCILE_INTERVAL = _int("RECONCILE_INTERVAL", 60)
    STALE_AFTER = _int("STALE_AFTER", 300)
    RECONCILE_BATCH_SIZE = _int("RECONCILE_BATCH_SIZE", 5000)

    LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")

    # The web process (gunicorn.conf.py): threads per worker process, and how long a client may leave a
    # thread waiting for the next bytes of its request (or for it to take the answer) before it is dropped.
    WEB_THREADS = _int("WEB_THREADS", 16)
    WEB_CLIENT_TIMEOUT = _float("WEB_CLIENT_TIMEOUT", 10)

    # API keys (README, "Authentication and API keys"): these, and the hashed keys in the database.
    API_KEYS = str_list(os.environ.get("API_KEYS", ""))
    REQUIRE_API_KEYS = False  # ProductionConfig refuses to start without a key
    # One budget per API key for the whole API (Flask-Limiter notation), counted in Redis.
    API_RATE_LIMIT = os.environ.get("API_RATE_LIMIT", "6000 per minute")
    RATELIMIT_STORAGE_URI = limits_storage_uri(REDIS_URL)
    # Larger bodies are answered 413 before they are read.
    MAX_CONTENT_LENGTH = _int("MAX_CONTENT_LENGTH", 5 * 1024 * 1024)
    # Idempotency keys (README, "Idempotency keys").
    IDEMPOTENCY_TTL = _int("IDEMPOTENCY_TTL", 24 * 3600)
    IDEMPOTENCY_WAIT = _float("IDEMPOTENCY_WAIT", 5)
    IDEMPOTENCY_ABANDON_AFTER = _int("IDEMPOTENCY_ABANDON_AFTER", 300)

    # flask-smorest / OpenAPI
    API_TITLE = "Campaign dispatch API"
    API_VERSION = "1.0"
    OPENAPI_VERSION = "3.0.3"
    OPENAPI_URL_PREFIX = "/"
    OPENAPI_JSON_PATH = "openapi.json"
    API_SPEC_OPTIONS = {"security": [{"bearerAuth": []}]}
    # Swagger UI at /docs, its assets served by the app (see app/openapi.py): it works offline.
    OPENAPI_SWAGGER_UI_PATH = "docs"
    OPENAPI_SWAGGER_UI_URL = "/docs/assets/"
    OPENAPI_SWAGGER_UI_CONFIG = {"validatorUrl": None}


class ProductionConfig(Config):
    """What `wsgi.py` (gunicorn, the `web` process) runs with: it refuses to start without an API key."""

    REQUIRE_API_KEYS = True
