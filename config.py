"""Configuration: every setting the service reads from the environment (and a `.env` file), in one table.

Each setting has a parser, a safe default and a line of documentation (docs/configuration.md lists them
all; a test keeps the two in step). Values are parsed when this module is imported, but a bad value does
not raise here: it is kept as `Invalid`, and every process checks its configuration at start
(`check_settings`, called by `create_app`) and refuses to run with one line naming every bad setting. Only
values are checked: a process starts while PostgreSQL or Redis is down, and recovers when they return.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from dotenv import load_dotenv
from limits import parse_many

BASE_DIR = Path(__file__).resolve().parent
load_dotenv(BASE_DIR / ".env")


class SettingsError(Exception):
    """A setting with a value the service cannot run with; the message names it."""


@dataclass(frozen=True)
class Invalid:
    """A setting whose environment value did not parse; `check_settings` reports it."""

    name: str
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Setting:
    """One environment variable: its config key (the same name unless given), default (as it would be
    written in the environment), parser, and what it means. A secret's value never appears in an error."""

    name: str
    default: str
    help: str
    parse: Callable[[str], object] = str
    key: str | None = None
    secret: bool = False

    @property
    def config_key(self) -> str:
        return self.key or self.name

    def load(self, environ: Mapping[str, str]) -> object:
        raw = environ.get(self.name, "").strip() or self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            shown = "" if self.secret else f" (got {raw!r})"
            return Invalid(self.name, f"{exc}{shown}")


# --- parsers: each turns an environment string into a value, or raises ValueError saying what it wants ---


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"must be between {minimum} and {maximum}" if maximum else f"must be at least {minimum}")
        return value

    return parse


def number(minimum: float = 0.0, maximum: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not (value >= minimum and (maximum is None or value <= maximum)):  # also refuses nan
            raise ValueError(f"must be between {minimum} and {maximum}" if maximum else f"must be at least {minimum}")
        return value

    return parse


def choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError("must be one of " + ", ".join(options))
        return raw

    return parse


def str_list(raw: str) -> list[str]:
    """`"a, b,"` -> `["a", "b"]`."""
    return [part.strip() for part in raw.split(",") if part.strip()]


def keywords(raw: str) -> list[str]:
    """`"STOP, stopall"` -> `["STOP", "STOPALL"]`: at least one word, each letters and digits only (a
    keyword is the whole text of a reply, matched in any case and width: NFKC, as replies are)."""
    values = [unicodedata.normalize("NFKC", word).upper() for word in str_list(raw)]
    if not values:
        raise ValueError("must name at least one keyword")
    bad = [word for word in values if not word.isalnum()]
    if bad:
        raise ValueError(f"keywords are single words of letters and digits, not {bad[0]!r}")
    return values


def long_secret(raw: str) -> str:
    """Empty, or a secret of at least 32 characters (a short one can be guessed)."""
    if raw and len(raw) < 32:
        raise ValueError(
            "must be at least 32 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
            "or empty for a key the service makes and keeps in its database"
        )
    return raw


def queue_name(raw: str) -> str:
    if not raw.replace("_", "").replace("-", "").replace(".", "").replace(":", "").isalnum():
        raise ValueError("must be a name of letters, digits, '_', '-', '.' or ':'")
    return raw


def queue_names(raw: str) -> list[str]:
    """A non-empty comma-separated list of queue names."""
    values = [queue_name(value) for value in str_list(raw)]
    if not values:
        raise ValueError("must name at least one queue")
    return values


def seconds_list(raw: str) -> list[int]:
    """`"10,30,60"` -> `[10, 30, 60]`: whole numbers of seconds, at least one."""
    try:
        values = [int(part) for part in str_list(raw)]
    except ValueError:
        raise ValueError("must be whole numbers of seconds, separated by commas") from None
    if not values or any(v < 0 for v in values):
        raise ValueError("must be whole numbers of seconds (0 or more), separated by commas")
    return values


def whatsapp_version(raw: str) -> str:
    if not (raw.startswith("v") and raw[1:].replace(".", "", 1).isdigit()):
        raise ValueError("must be a Graph API version such as v21.0")
    return raw


def boolean(raw: str) -> bool:
    """`true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`, any case)."""
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def optional(raw: str) -> str | None:
    return raw or None


def log_level(raw: str) -> str:
    return choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")(raw.upper())


def rate_limit(raw: str) -> str:
    """Flask-Limiter's notation, e.g. `6000 per minute` or `100/second`."""
    try:
        parse_many(raw)
    except ValueError:
        raise ValueError("must be a rate such as '6000 per minute' or '100/second'") from None
    return raw


def optional_rate_limit(raw: str) -> str | None:
    """A throughput limit in the same notation (`100/second`, or several: `10/second;500/minute`); empty:
    unlimited."""
    if not raw:
        return None
    try:
        items = parse_many(raw)
    except ValueError:
        raise ValueError("must be a rate such as '100/second', or empty for no limit") from None
    if any(item.amount < 1 for item in items):
        raise ValueError("must allow at least 1 request per period; leave it empty for no limit")
    return raw


def optional_price(raw: str) -> Decimal | None:
    """A price per unit as a decimal number (`0.8`), kept exact; empty: none."""
    if not raw:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("must be a decimal number such as 0.8") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be a decimal number of 0 or more, such as 0.8")
    return value


def optional_currency(raw: str) -> str | None:
    """An ISO 4217 currency code (`KES`, `USD`); empty: none."""
    if not raw:
        return None
    code = raw.upper()
    if len(code) != 3 or not code.isascii() or not code.isalpha():
        raise ValueError("must be an ISO 4217 currency code of three letters, such as KES")
    return code


def phone_region(raw: str) -> str:
    region = raw.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("must be a two-letter region code such as KE or US")
    return region


@dataclass(frozen=True)
class TimeWindow:
    """A daily window of local time, `start` included, `end` excluded; it crosses midnight when `end`
    comes before `start` (`20:00-08:00`)."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def _clock_time(raw: str) -> time:
    hours, sep, minutes = raw.partition(":")
    if not sep or len(hours) != 2 or len(minutes) != 2 or not (hours + minutes).isdigit():
        raise ValueError
    return time(int(hours), int(minutes))  # ValueError past 23:59


def quiet_hours(raw: str) -> TimeWindow | None:
    """`HH:MM-HH:MM` in the recipient's local time (it may cross midnight); empty: none."""
    if not raw:
        return None
    start, sep, end = raw.replace(" ", "").partition("-")
    try:
        window = TimeWindow(_clock_time(start), _clock_time(end))
    except ValueError:
        raise ValueError("must be a window such as 20:00-08:00 (HH:MM-HH:MM, 24-hour), or empty for none") from None
    if not sep or window.start == window.end:
        raise ValueError("must be a window such as 20:00-08:00 whose start and end differ, or empty for none")
    return window


@dataclass(frozen=True)
class FrequencyCap:
    """At most `messages` sent to one customer in any `period`, all campaigns and channels together."""

    messages: int
    period: timedelta


def frequency_cap(raw: str) -> FrequencyCap | None:
    """`2/7d`: at most 2 messages sent to a customer in any 7 days (`h` hours or `d` days); empty: off."""
    if not raw:
        return None
    match = re.fullmatch(r"([1-9][0-9]{0,5})/([1-9][0-9]{0,4})([hd])", raw.replace(" ", ""))
    if match is None:
        raise ValueError("must be a cap such as 2/7d (messages per hours `h` or days `d`), or empty for none")
    amount = int(match.group(2))
    period = timedelta(hours=amount) if match.group(3) == "h" else timedelta(days=amount)
    return FrequencyCap(int(match.group(1)), period)


def time_zone(raw: str) -> str:
    """An IANA time zone name known to this system (`Africa/Nairobi`)."""
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone such as Africa/Nairobi") from None
    return raw


def database_url(raw: str) -> str:
    """The SQLAlchemy URL for `raw`: PostgreSQL through psycopg 3 (Heroku's `postgres://` accepted), or
    SQLite; empty is a SQLite file in the instance folder."""
    if not raw:
        return f"sqlite:///{Path(INSTANCE_PATH) / 'campaigns.db'}"
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix) :]
    if raw.startswith("sqlite://"):
        return raw
    raise ValueError("must be a postgresql:// (or postgres://) URL, or sqlite:///path")


def redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def http_url(raw: str) -> str:
    """An http(s) URL without a trailing slash, or empty."""
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def mask_url(url: str) -> str:
    """`url` with its password replaced by `***`, fit for a log line or the terminal."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def limits_storage_uri(url: str) -> str:
    """Flask-Limiter's name for the same Redis (it spells a unix socket `redis+unix://`)."""
    return "redis+" + url if url.startswith("unix://") else url


# Local state: the SQLite file (without DATABASE_URL), and `flask up`'s embedded Redis and API key.
INSTANCE_PATH = os.path.abspath(os.environ.get("INSTANCE_PATH") or BASE_DIR / "instance")

MB = 1024 * 1024

# Every setting, grouped as docs/configuration.md groups them.
SETTINGS: tuple[Setting, ...] = (
    # Where the data lives
    Setting("DATABASE_URL", "", "PostgreSQL in production (`postgres://` is accepted); empty: a SQLite file in "
            "the instance folder", database_url, key="SQLALCHEMY_DATABASE_URI", secret=True),
    Setting("DATABASE_CONNECT_TIMEOUT", "3", "seconds to wait for a new PostgreSQL connection (libpq "
            "`connect_timeout`, at least 2; 0: psycopg's default, 130); also the longest the pool's pre-ping may "
            "take", integer(0, 600)),
    Setting("DATABASE_PING_AFTER", "0.5", "seconds a pooled PostgreSQL connection may rest and still be handed out "
            "without a ping first (a connection back in the pool for longer is pinged, and replaced if the server "
            "closed it); 0 pings every time", number(0, 60)),
    Setting("DATABASE_STATEMENT_TIMEOUT", "5", "seconds a statement may run (PostgreSQL `statement_timeout`) in "
            "the web, worker and scheduler processes, with a client-side deadline 1 s longer on each round trip "
            "for a server that stops answering; other Flask CLI commands (migrations, imports) run without; 0 "
            "turns both off", number(0, 3600)),
    Setting("SEND_STATEMENT_TIMEOUT", "120", "seconds a send's `INSERT ... SELECT` of one batch of recipients "
            "(`RECIPIENT_BATCH`) may run, and a campaign's per-link table", number(1, 3600)),
    Setting("EXPORT_STATEMENT_TIMEOUT", "600", "seconds a campaign's CSV export (`GET /campaigns/{id}/messages.csv`) "
            "may run on PostgreSQL, the time its client takes to read it included (its one `COPY` statement's "
            "`statement_timeout`, and its round trips' deadline 1 s longer); 0: no limit", number(0, 86400)),
    Setting("DATABASE_POOL_SIZE", "16", "PostgreSQL connections each `web` process (and each CLI command) keeps "
            "for reuse (5 more are opened for a burst and closed after it); at least `WEB_THREADS`, so that no "
            "request opens and closes a connection of its own", integer(1, 1000)),
    Setting("WORKER_DATABASE_POOL_SIZE", "8", "the most PostgreSQL connections a `worker` process opens, "
            "whatever its `WORKER_CONCURRENCY`: a send holds one only for its claim and its record, never across "
            "the provider call (the connection budget: docs/architecture.md)", integer(1, 1000)),
    Setting("DATABASE_PGBOUNCER", "false", "`true` when `DATABASE_URL` is a PgBouncer in transaction mode: no "
            "server-side prepared statement and no startup option is used (set the statement timeout on the "
            "database role instead: docs/architecture.md#the-connection-budget)", boolean),
    Setting("DATABASE_RETRY_AFTER", "5", "the `Retry-After` of a `503` for an unavailable database, in seconds",
            integer(1, 3600)),
    Setting("REDIS_URL", "redis://127.0.0.1:6379/0", "Redis for RQ, rq-scheduler and the rate limiter "
            "(`flask up` without it: an embedded redis-server)", redis_url, secret=True),
    Setting("REDIS_CONNECT_TIMEOUT", "0.5", "seconds to wait for a connection to Redis (all processes)",
            number(0.01, 60)),
    Setting("REDIS_SOCKET_TIMEOUT", "1", "seconds the web, the scheduler, the rate limiter and the worker's "
            "jobs wait for a Redis answer (RQ's own connection in a worker waits longer than its wait for a job)",
            number(0.01, 60)),
    Setting("INSTANCE_PATH", "instance/ in the project", "local state: the SQLite file without DATABASE_URL; "
            "`flask up`'s embedded Redis, API key and lock", lambda raw: INSTANCE_PATH),
    # Queues and the worker
    Setting("SEND_QUEUE", "campaign_sends", "the queue of send jobs, one per message", queue_name),
    Setting("CONTROL_QUEUE", "campaign_control", "the queue of campaign-level jobs: dispatch, refill, cancel, "
            "reconcile, imports", queue_name),
    Setting("QUEUES", "CONTROL_QUEUE,SEND_QUEUE", "queues a worker listens on, in priority order", queue_names),
    Setting("RETRY_INTERVALS", "10,30,60", "seconds before the 1st, 2nd, 3rd retry of a failed send; the worker "
            "that runs the failed attempt decides, from its own setting", seconds_list),
    Setting("JOB_TIMEOUT", "60", "seconds a send job may run; also the worker's RQ `worker_ttl` (at least 60)",
            integer(1)),
    Setting("JOB_RESULT_TTL", "10", "seconds a finished send job stays in Redis (the row is the record)",
            integer(0)),
    Setting("RECORD_RETRY_WINDOW", "20", "seconds a send job keeps trying to record an attempt while the database "
            "is unavailable (at most half of `JOB_TIMEOUT`); after a longer outage its claim's lease runs out and "
            "the reconciler sends it again", number(0, 3600)),
    Setting("ENQUEUE_BATCH_SIZE", "1000", "jobs per pipelined `enqueue_many`", integer(1)),
    Setting("SEND_WINDOW", "500", "send jobs a sending campaign has in Redis at most (queued or running): Redis "
            "holds the windows, not the audiences; a `high` priority campaign's window is twice this, a `low` one's "
            "half. Keep it above the workers' total `WORKER_CONCURRENCY` (docs/operations.md)", integer(1, 100000)),
    # Sending
    Setting("RECIPIENT_BATCH", "10000", "customers a send to an audience reads per batch: the send request adds "
            "the first batch's messages and answers, a job of the control queue adds the rest batch by batch while "
            "the first are sent (docs/architecture.md)", integer(1, 1000000)),
    Setting("MAX_SEND_IDS", "10000", "most `customer_ids` in one send; use an audience beyond", integer(1)),
    Setting("SMS_SEGMENT_PRICE", "", "what one SMS segment costs (a decimal number, e.g. `0.8`), for the `cost` "
            "of `POST /campaigns/{id}/estimate`; set with CURRENCY, or neither", optional_price),
    Setting("CURRENCY", "", "the ISO 4217 code of SMS_SEGMENT_PRICE (e.g. `KES`); set with it, or neither",
            optional_currency),
    # Providers (docs/providers.md): a campaign's channel picks one.
    Setting("SMS_PROVIDER", "mock", "who sends SMS: `mock`, `africastalking` or `twilio`",
            choice("mock", "africastalking", "twilio")),
    Setting("WHATSAPP_PROVIDER", "mock", "who sends WhatsApp messages: `mock` or `whatsapp_cloud`",
            choice("mock", "whatsapp_cloud")),
    Setting("PUBLIC_BASE_URL", "", "the URL at which providers reach this service (https in production), for "
            "Twilio's `StatusCallback` and to check Twilio's signatures behind a proxy", http_url),
    Setting("LINK_BASE_URL", "", "where a campaign's short links point (`{LINK_BASE_URL}/{code}`; the app answers "
            "`/l/{code}`): a short domain pointed at the app (docs/operations.md); empty: `{PUBLIC_BASE_URL}/l`, or "
            "`http://127.0.0.1:{PORT}/l` when that is empty too", http_url),
    Setting("WEBHOOK_TOKEN", "", "the secret Africa's Talking callbacks must carry as `?token=` (it does not sign "
            "them)", secret=True),
    Setting("OPT_OUT_KEYWORDS", "STOP,STOPALL,UNSUBSCRIBE,CANCEL,END,QUIT", "comma-separated words that, as "
            "the whole text of a message a customer sends us (trimmed, any case or width, invisible characters "
            "ignored), opt them out of that channel",
            keywords),
    Setting("OPT_IN_KEYWORDS", "START,UNSTOP", "comma-separated words that opt a customer back in to the "
            "channel they send them on; none may be an opt-out keyword", keywords),
    Setting("PROVIDER_CONNECT_TIMEOUT", "5", "seconds to connect to a provider's API", number(0.1, 60)),
    Setting("PROVIDER_READ_TIMEOUT", "15", "seconds to wait for a provider's answer; past it the attempt's "
            "outcome is unknown (the provider may have taken it: see docs/providers.md)", number(0.1, 120)),
    Setting("RETRY_UNKNOWN", "false", "whether an attempt whose outcome is unknown (no answer after the request "
            "went out) is retried like a transient failure: `true` prefers a possible duplicate to a possible "
            "miss", boolean),
    Setting("PROVIDER_MAX_CONNECTIONS", "24", "connections a process keeps open to each provider; at least "
            "`WORKER_CONCURRENCY`, so that no send waits for a connection after it took its slot at the provider",
            integer(1)),
    Setting("SMS_RATE_LIMIT", "", "most SMS sent per provider account, by all workers together, in any window of "
            "the period (e.g. `100/second`, paced at 97/s for jitter: see docs/providers.md); empty: unlimited",
            optional_rate_limit),
    Setting("WHATSAPP_RATE_LIMIT", "", "most WhatsApp messages sent per provider account (phone number id), by all "
            "workers together (e.g. `80/second`); empty: unlimited", optional_rate_limit),
    Setting("QUIET_HOURS", "", "a daily window (`HH:MM-HH:MM`, in the recipient's local time; it may cross "
            "midnight, e.g. `20:00-08:00`) in which no message of a campaign that respects quiet hours is sent: it "
            "waits for the window's end; empty: none", quiet_hours),
    Setting("FREQUENCY_CAP", "", "at most this many messages sent to one customer in any period, all campaigns "
            "and channels together (e.g. `2/7d`; `h` hours or `d` days): a send leaves capped customers out, unless "
            "its campaign has `ignore_frequency_cap`; empty: off", frequency_cap),
    Setting("DEFAULT_TIMEZONE", "Africa/Nairobi", "the recipient's time zone for QUIET_HOURS when their number "
            "maps to no time zone (one that maps to several waits for the window's end in all of them)",
            time_zone),
    Setting("AFRICASTALKING_USERNAME", "", "Africa's Talking username (`sandbox` for the sandbox)"),
    Setting("AFRICASTALKING_API_KEY", "", "Africa's Talking API key", secret=True),
    Setting("AFRICASTALKING_SENDER_ID", "", "optional `from`: a sender id or short code of the account", optional),
    Setting("AFRICASTALKING_BASE_URL", "", "empty: `https://api.africastalking.com`, or "
            "`https://api.sandbox.africastalking.com` for the `sandbox` username", http_url),
    Setting("TWILIO_ACCOUNT_SID", "", "Twilio account SID (`AC...`)"),
    Setting("TWILIO_AUTH_TOKEN", "", "Twilio auth token (also checks its callbacks' signatures)", secret=True),
    Setting("TWILIO_FROM", "", "the Twilio number (E.164) messages come from; or set TWILIO_MESSAGING_SERVICE_SID",
            optional),
    Setting("TWILIO_MESSAGING_SERVICE_SID", "", "a Twilio Messaging Service (`MG...`) to send through instead of "
            "TWILIO_FROM", optional),
    Setting("TWILIO_BASE_URL", "https://api.twilio.com", "Twilio's API", http_url),
    Setting("WHATSAPP_ACCESS_TOKEN", "", "WhatsApp Cloud API access token", secret=True),
    Setting("WHATSAPP_PHONE_NUMBER_ID", "", "the WhatsApp Business phone number id messages come from"),
    Setting("WHATSAPP_APP_SECRET", "", "the Meta app secret that signs webhook posts (`X-Hub-Signature-256`)",
            secret=True),
    Setting("WHATSAPP_VERIFY_TOKEN", "", "the token Meta's webhook set-up sends back (`hub.verify_token`)",
            secret=True),
    Setting("WHATSAPP_API_VERSION", "v21.0", "Graph API version", whatsapp_version),
    Setting("WHATSAPP_BASE_URL", "https://graph.facebook.com", "the Graph API", http_url),
    Setting("MOCK_SENDER_FAILURE_RATE", "0", "share of attempts the mock sender fails at random",
            number(0, 1)),
    Setting("MOCK_SENDER_FAIL_ATTEMPTS", "0", "the mock sender fails the first N attempts of every message",
            integer(0)),
    Setting("MOCK_SENDER_LATENCY", "0", "seconds each mock send takes", number(0, 60)),
    Setting("MOCK_SENDER_LOG", "", "file the mock sender appends one JSON line per attempt to", optional),
    # Customers
    Setting("DEFAULT_PHONE_REGION", "KE", "region for numbers written without a country code", phone_region),
    Setting("IMPORT_BATCH_SIZE", "1000", "rows per upsert statement in CSV imports (an import job commits its "
            "progress with each)", integer(1)),
    Setting("IMPORT_MAX_CONTENT_LENGTH", str(200 * MB), "largest CSV import body, in bytes, however it is sent; "
            "larger is a `413`", integer(1)),
    Setting("IMPORT_SYNC_MAX_BYTES", str(10 * MB), "larger imports run as a job (`202`, `GET "
            "/customers/imports/{id}`)", integer(0)),
    # Scheduling and self-healing
    Setting("SCHEDULER_INTERVAL", "5", "seconds between rq-scheduler's checks", number(0.1)),
    Setting("RECONCILE_INTERVAL", "60", "seconds between reconciler runs", integer(1)),
    Setting("STALE_AFTER", "300", "seconds a queued message may go untouched before the reconciler looks for its "
            "job in Redis (and puts it back in line when Redis lost it)", integer(1)),
    Setting("WORKER_CONCURRENCY", "24", "jobs a `worker` process runs at once, each in a thread (a send mostly "
            "waits for the provider; its connections come from `WORKER_DATABASE_POOL_SIZE`); 1 with SQLite",
            integer(1, 256)),
    Setting("WORKER_HEARTBEAT_INTERVAL", "10", "seconds an idle worker waits for a job before it heartbeats "
            "again; `/health` stops counting a worker whose heartbeat is this (or its job's timeout) plus 5 s "
            "overdue", integer(1, 300)),
    Setting("STATS_FOLD_INTERVAL", "1", "seconds between the moves of the message count changes into each "
            "campaign's kept counts (PostgreSQL), done by one worker at a time; the stats are exact either way, "
            "this bounds what a read of them sums", number(0.05, 3600)),
    Setting("RECONCILE_BATCH_SIZE", "5000", "rows per batch in the reconciler", integer(1)),
    Setting("KEPT_RECEIPT_TTL", "86400", "seconds a delivery receipt that names no recorded message is kept, to be "
            "applied if its message is recorded meanwhile; older ones are deleted by the reconciler and counted "
            "(`dispatch_receipts_expired_total`)", integer(60)),
    # The API
    Setting("SECRET_KEY", "", "the key that signs what the service hands out and must recognise again "
            "(pagination cursors; changing it makes cursors already handed out a `422`); at least 32 characters; "
            "empty: a random key the service makes once and keeps in its database, shared by every process",
            long_secret, secret=True),
    Setting("API_KEYS", "", "comma-separated API keys accepted besides the hashed keys in the database",
            str_list, secret=True),
    Setting("API_RATE_LIMIT", "6000 per minute", "requests per API key for the whole API (e.g. `100/second`)",
            rate_limit),
    Setting("MAX_CONTENT_LENGTH", str(5 * MB), "largest request body in bytes; larger is a `413`", integer(1)),
    Setting("IDEMPOTENCY_TTL", str(24 * 3600), "seconds an `Idempotency-Key` and its answer are kept",
            integer(1)),
    Setting("IDEMPOTENCY_PURGE_INTERVAL", "600", "seconds between deletions of expired idempotency keys (a "
            "periodic job)", integer(1)),
    Setting("IDEMPOTENCY_WAIT", "5", "seconds a repeat waits for the first request with its key before a `409`",
            number(0, 60)),
    Setting("IDEMPOTENCY_ABANDON_AFTER", "300", "seconds after which an in-progress key is taken to be a dead "
            "request's and taken over", integer(1)),
    # The web process (gunicorn.conf.py)
    Setting("WEB_THREADS", "16", "threads per `web` process: how many requests each can serve at once",
            integer(1, 1000)),
    Setting("WEB_CLIENT_TIMEOUT", "10", "seconds a client may leave a `web` thread waiting for the next bytes of "
            "its request (or to take its answer) before it is dropped; 0: no limit", number(0, 3600)),
    Setting("WEB_SWITCH_INTERVAL", "0.0005", "seconds a `web` thread keeps Python's interpreter lock while another "
            "thread waits for it (`sys.setswitchinterval`; Python's own is 0.005): a thread whose database answer has "
            "come goes on within this, instead of waiting behind a busy one (docs/operations.md)", number(0.0001, 0.1)),
    Setting("METRICS_FLUSH_INTERVAL", "2", "seconds between two flushes of a process's metrics into Redis, where "
            "`GET /metrics` adds up every process's", number(0.1, 60)),
    # Logs
    Setting("LOG_LEVEL", "INFO", "logs are JSON lines with a request id, and job/campaign/message ids in the "
            "worker; below DEBUG, RQ's and httpx's lines about each job and request are left out; gunicorn's own "
            "lines (not its access log) follow it too", log_level),
    Setting("UP_PROGRESS_INTERVAL", "5", "seconds between two of `flask up`'s progress lines about each campaign "
            "sending (done/total, outcomes, rate); it looks every 0.2 s", number(0.2, 3600)),
)  # fmt: skip

# Read by the Procfile and `flask up`, not by the app.
PROCESS_SETTINGS: tuple[Setting, ...] = (
    Setting("PORT", "5000", "port of `flask up` and of the Procfile's `web`", integer(1, 65535)),
    Setting("WEB_CONCURRENCY", "2", "gunicorn worker processes of the Procfile's `web`", integer(1)),
)


class Config:
    """The settings above, parsed from the environment, and the fixed options of Flask's extensions."""

    SQLALCHEMY_ENGINE_OPTIONS = {"pool_pre_ping": True}
    MAX_RETRIES = 3
    REQUIRE_API_KEYS = False  # ProductionConfig refuses to start without a key

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


for _setting in SETTINGS:
    setattr(Config, _setting.config_key, _setting.load(os.environ))
if not os.environ.get("QUEUES", "").strip():
    Config.QUEUES = [Config.CONTROL_QUEUE, Config.SEND_QUEUE]
# The rate limiter counts in the same Redis.
Config.RATELIMIT_STORAGE_URI = Config.REDIS_URL and limits_storage_uri(Config.REDIS_URL)


class ProductionConfig(Config):
    """What `wsgi.py` (gunicorn, the `web` process, and `flask --app wsgi` commands) runs with: the web
    refuses to start without an API key."""

    REQUIRE_API_KEYS = True


def check_settings(config: Mapping[str, object]) -> None:
    """Raise `SettingsError` naming every setting the service cannot run with, in one message (`NAME: why`,
    separated by `; `), so that one start reports them all."""
    problems = settings_problems(config)
    if problems:
        raise SettingsError("; ".join(problems))


def settings_problems(config: Mapping[str, object]) -> list[str]:
    """Each problem with `config` as `NAME: why`: values that did not parse first, then the settings that do
    not fit together (those are checked only between values that parsed)."""
    problems = [
        f"{value.name}: {value.reason}"
        for setting in SETTINGS
        if isinstance(value := config.get(setting.config_key), Invalid)
    ]

    def valid(*names: str) -> bool:
        return not any(isinstance(config.get(name), Invalid) for name in names)

    if valid("QUEUES", "SEND_QUEUE", "CONTROL_QUEUE"):
        missing = [name for name in config["QUEUES"] if name not in (config["SEND_QUEUE"], config["CONTROL_QUEUE"])]
        if missing:
            problems.append(f"QUEUES: {', '.join(missing)} is neither SEND_QUEUE nor CONTROL_QUEUE")
    if valid("OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS"):
        both = sorted(set(config["OPT_OUT_KEYWORDS"]) & set(config["OPT_IN_KEYWORDS"]))
        if both:
            problems.append(f"OPT_IN_KEYWORDS: {', '.join(both)} is also in OPT_OUT_KEYWORDS")
    for provider in (config["SMS_PROVIDER"], config["WHATSAPP_PROVIDER"]):
        for names in PROVIDER_REQUIRES.get(provider, ()):
            if not any(config.get(name) for name in names) and valid(*names):
                which = " or ".join(names)
                problems.append(f"{names[0]}: required by the {provider} provider (set {which})")
    if valid("PROVIDER_MAX_CONNECTIONS", "WORKER_CONCURRENCY") and (
        config["PROVIDER_MAX_CONNECTIONS"] < config["WORKER_CONCURRENCY"]
    ):
        problems.append(
            f"PROVIDER_MAX_CONNECTIONS: {config['PROVIDER_MAX_CONNECTIONS']} is below WORKER_CONCURRENCY "
            f"({config['WORKER_CONCURRENCY']}): a send would wait for a connection"
        )
    if valid("DATABASE_POOL_SIZE", "WEB_THREADS") and config["DATABASE_POOL_SIZE"] < config["WEB_THREADS"]:
        problems.append(
            f"DATABASE_POOL_SIZE: {config['DATABASE_POOL_SIZE']} is below WEB_THREADS ({config['WEB_THREADS']}): "
            "each thread holds a connection while it serves a request"
        )
    for name, other in (("SMS_SEGMENT_PRICE", "CURRENCY"), ("CURRENCY", "SMS_SEGMENT_PRICE")):
        if valid(name, other) and config.get(name) is not None and config.get(other) is None:
            problems.append(f"{other}: required when {name} is set (an estimate's cost needs both)")
    if valid("PROVIDER_CONNECT_TIMEOUT", "PROVIDER_READ_TIMEOUT", "JOB_TIMEOUT"):
        budget = config["PROVIDER_CONNECT_TIMEOUT"] + config["PROVIDER_READ_TIMEOUT"]
        if budget * 2 > config["JOB_TIMEOUT"]:
            problems.append(
                f"PROVIDER_READ_TIMEOUT: with PROVIDER_CONNECT_TIMEOUT it is {budget:g} s, over half of JOB_TIMEOUT "
                f"({config['JOB_TIMEOUT']} s): a send job must outlast its provider call and record the outcome"
            )
    return problems


# The settings each provider cannot work without (any one of a group).
PROVIDER_REQUIRES: dict[str, tuple[tuple[str, ...], ...]] = {
    "africastalking": (("AFRICASTALKING_USERNAME",), ("AFRICASTALKING_API_KEY",), ("WEBHOOK_TOKEN",)),
    "twilio": (
        ("TWILIO_ACCOUNT_SID",),
        ("TWILIO_AUTH_TOKEN",),
        ("TWILIO_FROM", "TWILIO_MESSAGING_SERVICE_SID"),
        ("PUBLIC_BASE_URL",),
    ),
    "whatsapp_cloud": (
        ("WHATSAPP_ACCESS_TOKEN",),
        ("WHATSAPP_PHONE_NUMBER_ID",),
        ("WHATSAPP_APP_SECRET",),
        ("WHATSAPP_VERIFY_TOKEN",),
    ),
}


def settings_markdown() -> str:
    """The table of every setting for docs/configuration.md (`flask settings --markdown` prints it)."""
    rows = ["| name | default | meaning |", "| --- | --- | --- |"]
    for setting in (*SETTINGS, *PROCESS_SETTINGS):
        default = f"`{setting.default}`" if setting.default else "empty"
        rows.append(f"| `{setting.name}` | {default} | {setting.help} |")
    return "\n".join(rows) + "\n"


def shown_value(setting: Setting, value: object) -> str:
    """`value` as an operator may see it: passwords in URLs masked, other secrets hidden."""
    if isinstance(value, Invalid):
        return f"INVALID: {value.reason}"
    if setting.secret and isinstance(value, str) and "://" in value:
        return mask_url(value)
    if setting.secret:
        return "(set, hidden)" if value else "(empty)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "" if value is None else str(value)
