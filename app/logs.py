"""Structured logs: one JSON object a line, with the request id and, in the worker, the job,
campaign and message ids."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

from flask import Flask, g, has_request_context, request

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

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
        return json.dumps(entry, default=str)


def configure_logging(app: Flask) -> None:
    """JSON lines on stderr, at `LOG_LEVEL`; every response carries its `X-Request-ID`."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers = [handler]
    root.setLevel(app.config["LOG_LEVEL"])

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if 0 < len(incoming) <= 200 and incoming.isprintable() else uuid.uuid4().hex

    @app.after_request
    def _return_request_id(response):
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response
