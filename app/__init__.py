"""The application factory."""

from __future__ import annotations

import os

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app import auth, database, links, metrics, ratelimit
from app.bodies import Request
from app.errors import register_errorhandlers
from app.extensions import api, db, migrate
from app.logs import configure_logging
from app.openapi import docs_assets, register_components
from app.queues import init_redis
from config import INSTANCE_PATH, check_settings


class App(Flask):
    request_class = Request  # a body over its limit is a 413, never cut short (see app.bodies)

    def make_default_options_response(self):
        """`OPTIONS`: the allowed methods in `Allow`, and no body (Flask's default is an empty text/html 200)."""
        response = super().make_default_options_response()
        response.status_code = 204
        response.headers.pop("Content-Type", None)
        return response


# Connections a process may open beyond DATABASE_POOL_SIZE in a burst, closed when returned.
POOL_OVERFLOW = 5
# Seconds a worker's thread waits for one of its process's WORKER_DATABASE_POOL_SIZE connections: a
# longer wait means the database, not the pool, is what holds it up (counted as the database unavailable).
WORKER_POOL_TIMEOUT = 10


def create_app(config: object | str = "config.Config", overrides: dict | None = None) -> Flask:
    """Build the app from a config object (or its import path) and optional overrides."""
    app = App(__name__, instance_path=INSTANCE_PATH, instance_relative_config=True)
    app.config.from_object(config)
    if overrides:
        app.config.update(overrides)
    check_settings(app.config)  # a bad setting stops every process here, before it does anything
    app.json.sort_keys = False
    configure_logging(app)
    register_extensions(app)
    auth.init_app(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    metrics.init_app(app)  # its hooks go around every other hook
    links.install(app)  # /l/{code}, in front of the app and its hooks
    return app


def register_extensions(app: Flask) -> None:
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        if app.config.get("WORKER_PROCESS"):
            # A fixed budget whatever the concurrency: sends hold a connection only for their short transactions.
            pool = {"pool_size": app.config["WORKER_DATABASE_POOL_SIZE"], "max_overflow": 0}
            pool["pool_timeout"] = WORKER_POOL_TIMEOUT
        else:
            pool = {"pool_size": app.config["DATABASE_POOL_SIZE"], "max_overflow": POOL_OVERFLOW}
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {**app.config["SQLALCHEMY_ENGINE_OPTIONS"], **pool}
    db.init_app(app)
    database.init_app(app)
    migrate.init_app(app, db, directory=str(app.config.get("MIGRATIONS_DIR", "migrations")))
    api.init_app(app)
    register_components(api.spec)
    ratelimit.init_app(app)
    init_redis(app)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        os.makedirs(app.instance_path, exist_ok=True)


def register_blueprints(app: Flask) -> None:
    from app import audiences, campaigns, customers, health, webhooks

    api.register_blueprint(customers.bp)
    api.register_blueprint(campaigns.bp)
    api.register_blueprint(audiences.bp)
    api.register_blueprint(health.bp)
    api.register_blueprint(webhooks.bp)
    api.register_blueprint(metrics.bp)
    app.register_blueprint(docs_assets)


def register_commands(app: Flask) -> None:
    from app import cli

    cli.register(app)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """SQLite (development and fast tests): enforce foreign keys, and let the API and the worker
    write the same file without 'database is locked'."""
    if type(dbapi_connection).__module__ != "sqlite3":
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
