"""The OpenAPI document's shared parts: the `Api` class and component naming, the bearer security
scheme, the error responses every operation can give, and the Swagger UI assets served by the app itself
(the docs work offline)."""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from apispec import APISpec, BasePlugin
from flask import Blueprint
from flask_smorest import Api

from app.schemas import ErrorSchema

SECURITY_SCHEME = "bearerAuth"
DOCS_ASSETS_URL = "/docs/assets"
SWAGGER_UI_DIST = Path(flask_swagger_ui.__file__).resolve().parent / "dist"

UNAUTHORIZED = "Unauthorized"
RATE_LIMITED = "RateLimited"
TOO_LARGE = "PayloadTooLarge"
MALFORMED = "MalformedBody"
NOT_JSON = "UnsupportedMediaType"
UNAVAILABLE = "DatabaseUnavailable"


def schema_name(schema) -> str:
    """OpenAPI component name: the class name without `Schema`; a partial (PATCH) schema gets `Update`."""
    cls = schema if isinstance(schema, type) else type(schema)
    name = cls.__name__.removesuffix("Schema")
    return name + "Update" if getattr(schema, "partial", False) else name


class DocumentedApi(Api):
    """Errors are documented per status code with our error schema; no catch-all `default` response,
    so that an undocumented status is a visible bug."""

    ERROR_SCHEMA = ErrorSchema
    DEFAULT_ERROR_RESPONSE_NAME = None


def _error(description: str, headers: dict | None = None) -> dict:
    response: dict = {"description": description, "content": {"application/json": {"schema": ErrorSchema}}}
    if headers:
        response["headers"] = headers
    return response


def register_components(spec: APISpec) -> None:
    """The security scheme and the shared error responses; call before registering blueprints."""
    spec.components.security_scheme(
        SECURITY_SCHEME,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `flask api-keys create NAME`, or one of the API_KEYS setting.",
        },
    )
    spec.components.response(
        UNAUTHORIZED,
        _error(
            "Missing or invalid API key",
            {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
        ),
    )
    spec.components.response(
        RATE_LIMITED,
        _error(
            "Over the API key's rate limit (API_RATE_LIMIT)",
            {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds until the limit resets."}},
        ),
    )
    spec.components.response(TOO_LARGE, _error("Request body over MAX_CONTENT_LENGTH"))
    spec.components.response(MALFORMED, _error("Request body is not valid JSON"))
    spec.components.response(NOT_JSON, _error("Request body sent without `Content-Type: application/json`"))
    spec.components.response(
        UNAVAILABLE,
        _error(
            "The database is down, unreachable or not answering in time; retry after Retry-After seconds",
            {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}},
        ),
    )


class CommonResponsesPlugin(BasePlugin):
    """Documents on every operation the answers that do not come from its view: 503 when the database is
    unavailable, 401 and 429 when it needs a key (its `security` is not `[]`), 400 and 413 when it takes a
    body, 415 when that body is JSON."""

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        for operation in (operations or {}).values():
            responses = operation.setdefault("responses", {})
            _add(responses, 503, UNAVAILABLE)
            if operation.get("security") != []:
                _add(responses, 401, UNAUTHORIZED)
                _add(responses, 429, RATE_LIMITED)
            if "requestBody" in operation:
                _add(responses, 400, MALFORMED)
                _add(responses, 413, TOO_LARGE)
                if "application/json" in operation["requestBody"].get("content", {}):
                    _add(responses, 415, NOT_JSON)


def _add(responses: dict, code: int, response: str) -> None:
    """Add `response` for `code` unless the operation documents that code itself."""
    if code not in responses and str(code) not in responses:
        responses[str(code)] = response


docs_assets = Blueprint("docs_assets", __name__, static_folder=str(SWAGGER_UI_DIST), static_url_path=DOCS_ASSETS_URL)
