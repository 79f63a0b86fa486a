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
    """An error a service raises for the client to see; the blueprint layer needs no try/except.

    `errors` maps a field to its messages; `details` are machine-readable fields beside them."""

    code = 400

    def __init__(self, message: str, errors: dict[str, list[str]] | None = None, **details):
        super().__init__(message)
        self.message = message
        self.errors = errors
        self.details = details


class NotFoundError(AppError):
    code = 404


class ConflictError(AppError):
    code = 409


class ValidationFailed(AppError):
    code = 422


# webargs nests messages under the request location; a client only needs the field.
_LOCATIONS = {"json": "body", "query": "query", "form": "body", "files": "body", "headers": "headers"}


def field_errors(messages) -> dict[str, list[str]]:
    """marshmallow/webargs messages as `{field: [message, ...]}`, nested fields dotted and without the
    request location: `{"json": {"customer_ids": {"0": ["Not a valid integer."]}}}` ->
    `{"customer_ids.0": ["Not a valid integer."]}`. An error of a whole object (`_schema`) is named by
    the object, or by the location (`body`, `query`) for the whole request."""
    out: dict[str, list[str]] = {}

    def walk(node, field: str, location: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not field and not location and key in _LOCATIONS:
                    walk(value, "", _LOCATIONS[key])
                elif key == "_schema":
                    walk(value, field, location)
                else:
                    walk(value, f"{field}.{key}" if field else str(key), location)
        elif isinstance(node, (list, tuple)) and not all(isinstance(item, str) for item in node):
            for item in node:
                walk(item, field, location)
        else:
            texts = list(node) if isinstance(node, (list, tuple)) else [str(node)]
            out.setdefault(field or location or "request", []).extend(texts)

    walk(messages, "", "")
    return out


def describe_errors(errors: dict[str, list[str]]) -> str:
    """One line for the `message`: `channel: Must be one of: sms, whatsapp.; name: ...`."""
    return "; ".join(f"{name}: {text}" for name, texts in errors.items() for text in texts)


def error_response(code: int, message: str, errors: dict | None = None, headers=None, **details):
    """The JSON response for an error: `code`, `status`, `message`, `errors` (field -> messages, empty
    when no field is at fault) and any `details` beside them."""
    body = {"code": code, "status": _status_name(code), "message": message, "errors": errors or {}, **details}
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
    raw = data.get("messages") or data.get("errors")
    errors = field_errors(raw) if raw else {}
    message = data.get("message") or (f"Invalid request: {describe_errors(errors)}" if errors else None)
    if not message:
        message = exc.description or _status_name(exc.code or 500)
    headers = data.get("headers") or (exc.get_response().headers if exc.code == 405 else None)
    if exc.code == 405 and headers is not None:
        headers = [(k, v) for k, v in headers.items() if k.lower() == "allow"]
    return error_response(exc.code or 500, message, errors, headers)


def handle_too_large(exc: RequestEntityTooLarge):
    limit = request.max_content_length
    message = f"request body is over the limit of {limit} bytes" if limit else exc.description
    return error_response(413, message)


def handle_incomplete_body(exc: ClientDisconnected):
    # The client closed the connection, or sent nothing for WEB_CLIENT_TIMEOUT seconds, mid-body.
    return error_response(400, "the request body ended, or stopped arriving, before its Content-Length")


def handle_app_error(exc: AppError):
    return error_response(exc.code, exc.message, exc.errors, **exc.details)


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
