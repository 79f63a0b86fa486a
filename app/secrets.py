"""The service's secret key: what signs what the service hands out and must recognise when it comes back
(pagination cursors; later, the console's session cookies). One helper, `secret_key(app)`, for all of them;
each use mixes in its own purpose, so that a value signed for one is never valid for another.

It is SECRET_KEY when that is set. Otherwise the service makes a random key the first time one is needed
and keeps it in the database (`service_secrets`), so that every process of a deployment (every web and
worker process, on every machine) uses the same key without configuration, and a restart keeps it. The
first process to store it wins; the others read the winner's.
"""

from __future__ import annotations

import secrets

from flask import Flask
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.extensions import db
from app.models import ServiceSecret

# The row of `service_secrets` that holds the key.
KEY_NAME = "secret_key"

_secrets = ServiceSecret.__table__


def secret_key(app: Flask) -> bytes:
    """The secret key of `app`'s deployment: SECRET_KEY, or the one kept in the database (made on first
    use). Read from the database once per process; an unavailable database raises as any query does."""
    configured = app.config["SECRET_KEY"]
    if configured:
        return configured.encode()
    key = app.extensions.get("secret_key")
    if key is None:
        with app.app_context():
            key = app.extensions["secret_key"] = _stored_key().encode()
    return key


def _stored_key() -> str:
    """The key in `service_secrets`, on a connection of its own: a new random key is inserted unless one is
    there already (the insert first: on SQLite a transaction that has read cannot write once another has),
    then the one there is read, and both committed whatever the caller's transaction does."""
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    row = {"name": KEY_NAME, "value": secrets.token_hex(32), "created_at": clock.now()}
    with db.engine.begin() as connection:
        connection.execute(insert(_secrets).values(row).on_conflict_do_nothing(index_elements=["name"]))
        return connection.scalar(select(_secrets.c.value).where(_secrets.c.name == KEY_NAME))
