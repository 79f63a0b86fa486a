"""One JSON error shape for every error the app can answer:
`{"code": 422, "status": "Unprocessable Entity", "message": "...", "errors": {...}}`."""

from __future__ import annotations

import logging
from http import HTTPStatus

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, InternalServerError, RequestEntityTooLarge

from app.database import describe, is_unavailable

log = logging.getLogger(__name__)


class AppError(Exception):
    """An error a service raises for the client to see; the blueprint layer needs no try/except."""

    code = 400

    def __init__(self, message: str, errors: dict | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors


class NotFoundError(AppError):
    code = 404


class ConflictError(AppError):
    code = 409


class ValidationFailed(AppError):
    code = 422


def _flatten(messages, prefix: str = "") -> list[str]:
    """`{"json": {"customer_ids": {"0": ["Not a valid integer."]}}}` -> `["customer_ids.0: Not a valid integer."]`."""
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            # webargs nests by location; the location is noise to a client.
            name = "" if key in ("json", "query", "form", "files", "headers", "view_args") and not prefix else str(key)
            out.extend(_flatten(value, f"{prefix}.{name}" if prefix and name else prefix or name))
        return out
    if isinstance(messages, (list, tuple)):
        if all(isinstance(m, str) for m in messages):
            return [f"{prefix}: {m}" if prefix else m for m in messages]
        out = []
        for m in messages:
            out.extend(_flatten(m, prefix))
        return out
    return [f"{prefix}: {messages}" if prefix else str(messages)]


def error_response(code: int, message: str, errors: dict | None = None, headers=None):
    """The JSON response for an error."""
    body = {"code": code, "status": _status_name(code), "message": message}
    if errors:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = code
    if headers:
        response.headers.extend(headers)
    return response


def _status_name(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def handle_http_exception(exc: HTTPException):
    data = getattr(exc, "data", None) or {}
    errors = data.get("messages") or data.get("errors")
    message = data.get("message")
    if not message and errors:
        message = "Invalid request: " + "; ".join(_flatten(errors))
    if not message:
        message = exc.description or _status_name(exc.code or 500)
    headers = data.get("headers") or (exc.get_response().headers if exc.code == 405 else None)
    if exc.code == 405 and headers is not None:
        headers = [(k, v) for k, v in headers.items() if k.lower() == "allow"]
    return error_response(exc.code or 500, message, errors if isinstance(errors, dict) else None, headers)


def handle_too_large(exc: RequestEntityTooLarge):
    limit = request.max_content_length
    message = f"request body is over the limit of {limit} bytes" if limit else exc.description
    return error_response(413, message)


def handle_incomplete_body(exc: ClientDisconnected):
    # The client closed the connection, or sent nothing for WEB_CLIENT_TIMEOUT seconds, mid-body.
    return error_response(400, "the request body ended, or stopped arriving, before its Content-Length")


def handle_app_error(exc: AppError):
    return error_response(exc.code, exc.message, exc.errors)


def handle_database_unavailable(exc: Exception):
    """503 with `Retry-After`: the database is down, unreachable or not answering in time."""
    # One line without the SQL or its parameters: an outage fails every request, with the same story.
    log.warning("database unavailable", extra={"error": describe(exc)})
    seconds = current_app.config["DATABASE_RETRY_AFTER"]
    return error_response(
        503,
        f"the service cannot reach its database right now; retry after {seconds} seconds",
        headers={"Retry-After": str(seconds)},
    )


def handle_unexpected(exc: Exception):
    if is_unavailable(exc):
        return handle_database_unavailable(exc)
    # The client learns nothing of the internals; the log keeps the whole story.
    log.exception("unhandled error")
    return error_response(500, InternalServerError.description)


def register_errorhandlers(app: Flask) -> None:
    """Every error, expected or not, answers in the one JSON shape."""
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(RequestEntityTooLarge, handle_too_large)
    app.register_error_handler(ClientDisconnected, handle_incomplete_body)
    app.register_error_handler(AppError, handle_app_error)
    app.register_error_handler(Exception, handle_unexpected)
