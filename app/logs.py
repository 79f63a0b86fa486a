"""Structured logs: one JSON object a line, with the request id and, in the worker, the job,
campaign and message ids; and no secret in any line.

Africa's Talking's callbacks carry WEBHOOK_TOKEN in their URL (`?token=`), Meta's webhook check carries
WHATSAPP_VERIFY_TOKEN (`hub.verify_token`), and whatever logs a request's URL (gunicorn's access log and its
own lines, werkzeug's development server, an error's message) would write them. `redact` takes them out of
a line: the value of a query parameter that carries a secret by its name, or that equals a configured
secret; and a configured secret long enough to be found safely, wherever it is. The service's JSON lines
go through it (`JsonFormatter`), and so do gunicorn's (`RedactingFormatter`, set up in gunicorn.conf.py).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

from flask import Flask, current_app, g, has_app_context, has_request_context, request

from config import SETTINGS, Config

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# What a secret is replaced with.
REDACTED = "[redacted]"
# Query parameters whose value is a secret whatever it is: Africa's Talking's callback token, Meta's
# webhook verification token (matched in any case, once decoded).
SECRET_PARAMETERS = frozenset({"token", "hub.verify_token"})
# A configured secret this long is also taken out wherever it appears in a line; a shorter one only as the
# value of a query parameter (found anywhere, it would take ordinary words with it).
MIN_SECRET_IN_TEXT = 8
# A run of characters that may hold a URL or a query: what lies between spaces, quotes and brackets.
_WORD = re.compile(r"[^\s\"'<>()\[\]{},]+")


def configured_secrets(config: Mapping[str, object]) -> list[str]:
    """The values of the settings marked secret (`config.SETTINGS`) in `config`: each of a list (API_KEYS),
    the password of a URL (DATABASE_URL, REDIS_URL), any other as it is; empty ones left out."""
    found: list[str] = []
    for setting in SETTINGS:
        if not setting.secret:
            continue
        value = config.get(setting.config_key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "://" in item:
                try:
                    item = urlsplit(item).password
                except ValueError:
                    item = None
            if isinstance(item, str) and item:
                found.append(item)
    return found


def current_secrets() -> list[str]:
    """The secrets of the app in context, else those the environment configures (`config.Config`)."""
    if has_app_context():
        return configured_secrets(current_app.config)
    return configured_secrets({setting.config_key: getattr(Config, setting.config_key, None) for setting in SETTINGS})


def redact(line: str, secrets: Iterable[str]) -> str:
    """`line` with every secret replaced by `REDACTED`: the value of a query parameter named in
    `SECRET_PARAMETERS`, or equal (decoded as a query is) to one of `secrets`; and each of `secrets` of
    `MIN_SECRET_IN_TEXT` characters or more wherever it appears, as it is or escaped as in a URL."""
    secrets = [secret for secret in secrets if secret]
    values = set(secrets)

    def word(match: re.Match) -> str:
        text = match.group(0)
        if "=" not in text:
            return text
        head, sep, query = text.partition("?")
        if not sep:  # no URL: the word may be a query on its own (gunicorn's `%(q)s`) or `name=value`
            head, query = "", text
        return head + sep + "&".join(_redact_parameter(parameter, values) for parameter in query.split("&"))

    line = _WORD.sub(word, line)
    for secret in secrets:
        if len(secret) >= MIN_SECRET_IN_TEXT:
            for form in {secret, quote(secret), quote(secret, safe=""), quote_plus(secret)}:
                line = line.replace(form, REDACTED)
    return line


def _redact_parameter(parameter: str, values: set[str]) -> str:
    """`name=value` with the value redacted when it is a secret; a value that is itself `name=value` (a
    query logged after a label, `q=token=...`) is looked into."""
    name, sep, value = parameter.partition("=")
    if not sep:
        return parameter
    if unquote_plus(name).lower() in SECRET_PARAMETERS or {value, unquote(value), unquote_plus(value)} & values:
        return f"{name}={REDACTED}"
    return f"{name}={_redact_parameter(value, values)}" if "=" in value else parameter


def _scrubbed(value: object, secrets: list[str]) -> object:
    """`value` (a log line's field) with the secrets taken out of every string in it."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {key: _scrubbed(item, secrets) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(item, secrets) for item in value]
    return value


class RedactingFormatter(logging.Formatter):
    """Another formatter's lines (gunicorn's access and error lines), with the secrets taken out."""

    def __init__(self, inner: logging.Formatter | None, secrets: Callable[[], list[str]] = current_secrets):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets())


# The job a worker is handling, set around the whole of its handling, so that RQ's own lines about
# it (success, failure, retry) carry its id too, not only the lines logged while the job function runs.
worker_job_id: ContextVar[str | None] = ContextVar("worker_job_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if has_request_context():
            entry["request_id"] = getattr(g, "request_id", None)
        try:
            from rq import get_current_job

            job = get_current_job()
        except Exception:  # noqa: BLE001 - outside a worker
            job = None
        job_id = job.id if job is not None else worker_job_id.get()
        if job_id is not None:
            entry["job_id"] = job_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        secrets = current_secrets()
        return json.dumps(_scrubbed(entry, secrets), default=lambda value: redact(str(value), secrets))


# RQ's lines about each job (taken, done, its result kept, its retry scheduled): four a message, beside the
# service's own line about its outcome. Kept at DEBUG only.
_PER_JOB_LINES = (
    "Worker %s: %s: %s",
    "Successfully completed",
    "Worker %s: job %s result",
    "Job %s: scheduled for retry",
    "Job %s: enqueued for retry",
)


class PerJobLines(logging.Filter):
    """Drops RQ's INFO lines about each job (`_PER_JOB_LINES`); its other lines (a worker starting,
    stopping, cleaning its registries) and every warning pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.INFO or not str(record.msg).startswith(_PER_JOB_LINES)


def configure_logging(app: Flask) -> None:
    """JSON lines on stderr, at `LOG_LEVEL`; every response carries its `X-Request-ID`. Below DEBUG, the
    libraries' lines about each job and each request to a provider (RQ's, httpx's) are left out: one line
    per message's outcome is the service's own."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers = [handler]
    level = app.config["LOG_LEVEL"]
    root.setLevel(level)
    debug = logging.getLevelName(level) == logging.DEBUG or level == "DEBUG"
    for name in ("rq.worker", "rq.job"):
        logger = logging.getLogger(name)
        for existing in [f for f in logger.filters if isinstance(f, PerJobLines)]:
            logger.removeFilter(existing)
        if not debug:
            logger.addFilter(PerJobLines())
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else max(logging.WARNING, root.level))

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if 0 < len(incoming) <= 200 and incoming.isprintable() else uuid.uuid4().hex

    @app.after_request
    def _return_request_id(response):
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response
