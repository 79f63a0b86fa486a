"""API keys: every request needs `Authorization: Bearer <key>`, except the public endpoints.

A key is valid when it is one of `API_KEYS` (from the environment) or an unrevoked key made with
`flask api-keys create`, of which only the SHA-256 is stored. Each key has an owner string that
rate limits and idempotency keys are counted under: `key:<id>` for a stored key, `env:<hash prefix>`
for an environment key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

import click
from flask import Flask, current_app, request
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from werkzeug.exceptions import MethodNotAllowed

from app import clock
from app.errors import ConflictError, NotFoundError, error_response
from app.extensions import db
from app.models import ApiKey
from config import SettingsError

log = logging.getLogger(__name__)

# Health checks, the OpenAPI document, the docs page (with its assets) and the webhooks need no key.
# (Short links, /l/{code}, are answered in front of the app: app.links.redirect.)
PUBLIC_ENDPOINTS = frozenset(
    {
        "health.health",
        "api-docs.openapi_json",
        "api-docs.openapi_swagger_ui",
        "docs_assets.static",
        # Providers prove who they are with their own signature or token (app.webhooks).
        "webhooks.africastalking_delivery",
        "webhooks.africastalking_inbound",
        "webhooks.africastalking_opt_out",
        "webhooks.twilio_status",
        "webhooks.twilio_inbound",
        "webhooks.whatsapp_verify",
        "webhooks.whatsapp_statuses",
    }
)
KEY_PREFIX = "cd_"
_OWNER = "app.api_key_owner"


def hash_key(key: str) -> str:
    """The SHA-256 (hex) a key is stored and compared as."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def owner_of(key: str) -> str | None:
    """The owner string of `key`, or None if it is no valid key. Keys from `API_KEYS`, and tokens that
    cannot be a stored key, are told without the database."""
    digest = hash_key(key)
    for env_key in current_app.config["API_KEYS"]:
        if hmac.compare_digest(hash_key(env_key), digest):
            return f"env:{digest[:16]}"
    return stored_key_owner(key)


def stored_key_owner(key: str) -> str | None:
    """The owner string of `key` if it is an unrevoked key in the database, else None. A token that
    cannot be a stored key (no `cd_` prefix) is told without the database."""
    if not key.startswith(KEY_PREFIX):
        return None
    digest = hash_key(key)
    row = db.session.execute(
        select(ApiKey.id, ApiKey.key_hash).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is not None and hmac.compare_digest(row.key_hash, digest):
        return f"key:{row.id}"
    return None


def current_owner() -> str | None:
    """The owner of the request's API key (None without a valid key); looked up once per request. Raises
    the database's error when a stored key cannot be looked up, on every call of the request."""
    # Kept on the request, not on `g`: an app context can outlive a request (tests, CLI).
    if _OWNER not in request.environ:
        token = _bearer_token()
        try:
            request.environ[_OWNER] = owner_of(token) if token else None
        except SQLAlchemyError as exc:
            # The rate limiter asks first, then the key check: one wait for an unavailable database, not two.
            request.environ[_OWNER] = exc
            raise
    owner = request.environ[_OWNER]
    if isinstance(owner, SQLAlchemyError):
        raise owner
    return owner


def _public_request() -> bool:
    """Whether the request is for a public endpoint, with a method it allows or not (a POST to /health
    is its 405, not a 401)."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return True
    if not isinstance(request.routing_exception, MethodNotAllowed):
        return False
    allowed = request.routing_exception.valid_methods or []
    endpoint, _ = current_app.url_map.bind_to_environ(request.environ).match(method=allowed[0])
    return endpoint in PUBLIC_ENDPOINTS


def _require_api_key():
    if _public_request():
        return None
    if current_owner() is None:
        return error_response(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": 'Bearer realm="api"'},
        )
    return None


def no_key_configured(app: Flask) -> bool:
    """True when `API_KEYS` is empty and the database says it holds no unrevoked key (a database with no
    tables yet holds none). A database that cannot be reached proves nothing: the web starts, and keys
    are checked per request once it is back."""
    if app.config["API_KEYS"]:
        return False
    with app.app_context():
        try:
            count = db.session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))
        except OperationalError:
            log.warning("cannot count API keys: the database is unreachable; starting anyway")
            return False
        except SQLAlchemyError:  # not migrated yet
            count = 0
        finally:
            db.session.remove()
    return not count


def init_app(app: Flask) -> None:
    """Check the key on every request. With `REQUIRE_API_KEYS` (production), refuse to build an app
    that would answer every request with 401. Flask CLI commands are let through, so that an operator
    can migrate the database and create the first key with the production settings."""
    in_cli = click.get_current_context(silent=True) is not None
    if app.config["REQUIRE_API_KEYS"] and not in_cli and no_key_configured(app):
        raise SettingsError(
            "API_KEYS: no API key configured: set API_KEYS, or run `flask --app wsgi api-keys create NAME` "
            "(after `flask --app wsgi db upgrade`)"
        )
    app.before_request(_require_api_key)


def create_key(name: str, replace: bool = False) -> str:
    """Store a new key named `name` and return it; only its hash is kept. A name stays taken after
    its key is revoked (the record is kept), unless `replace` deletes the old key first."""
    existing = db.session.scalar(select(ApiKey).where(ApiKey.name == name))
    if existing is not None:
        if not replace:
            state = "a revoked" if existing.revoked_at else "an"
            raise ConflictError(f"{state} API key named {name!r} exists; choose another name")
        db.session.delete(existing)
        db.session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    db.session.add(ApiKey(name=name, key_hash=hash_key(key)))
    db.session.commit()
    return key


def revoke_key(name: str) -> None:
    """Revoke the key named `name`: it stops working at once."""
    api_key = db.session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if api_key is None:
        raise NotFoundError(f"no active API key named {name!r}")
    api_key.revoked_at = clock.now()
    db.session.commit()


def list_keys() -> list[ApiKey]:
    return list(db.session.scalars(select(ApiKey).order_by(ApiKey.id)))
