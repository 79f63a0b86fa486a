"""Extension objects, bound to the app in `create_app`, and the Redis/queue accessors."""

from __future__ import annotations

from apispec.ext.marshmallow import MarshmallowPlugin
from flask import current_app, request
from flask_limiter import ApplicationLimit, Limiter
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from rq import Queue
from sqlalchemy.orm import DeclarativeBase

from app.openapi import CommonResponsesPlugin
from app.schemas import ErrorSchema


class Base(DeclarativeBase):
    pass


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


def _rate_limit_key() -> str:
    """The owner of the request's API key; the client's address for a request without a valid key, or
    whose key cannot be looked up (the database is unavailable: the key check answers 503 next)."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.auth import current_owner  # app.auth needs `db` from here

    try:
        owner = current_owner()
    except SQLAlchemyError:
        owner = None
    return owner or f"ip:{request.remote_addr}"


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
api = DocumentedApi(
    spec_kwargs={
        "marshmallow_plugin": MarshmallowPlugin(schema_name_resolver=schema_name),
        "extra_plugins": [CommonResponsesPlugin()],
    }
)


def _api_rate_limit() -> ApplicationLimit:
    """One budget per API key across the whole API, read from the app's config on each request."""
    return ApplicationLimit(
        limit_provider=lambda: current_app.config["API_RATE_LIMIT"],
        key_function=_rate_limit_key,
        error_message="rate limit exceeded for this API key; retry after the Retry-After seconds",
    )


limiter = Limiter(
    _rate_limit_key,
    application_limits=[_api_rate_limit()],
    headers_enabled=True,
    # Redis down: the same budget, counted in this process's memory; Redis is looked for again only
    # now and then (1, 2, 4 ... 32 s apart), so that an outage does not add a Redis wait to every request.
    in_memory_fallback=[_api_rate_limit()],
    swallow_errors=True,  # and should even that fail: serve unlimited rather than fail every request
    strategy="fixed-window",
)


def redis_options(config) -> dict:
    """redis-py options for a connection that must fail fast (the web's, the scheduler's, the rate
    limiter's): `REDIS_CONNECT_TIMEOUT` and `REDIS_SOCKET_TIMEOUT`, and one immediate retry after a
    connection error (a pooled connection that a restarted Redis dropped), none after a timeout (the
    command may have run, and a stalled Redis would only be waited for twice)."""
    return {
        "socket_connect_timeout": config["REDIS_CONNECT_TIMEOUT"],
        "socket_timeout": config["REDIS_SOCKET_TIMEOUT"],
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }


def init_redis(app) -> None:
    """Open the app's Redis connection, failing fast (`redis_options`), unless one was given (tests pass
    fakeredis). In a worker, RQ raises its socket timeout above its blocking wait for a job."""
    if "redis" not in app.extensions:
        app.extensions["redis"] = Redis.from_url(app.config["REDIS_URL"], **redis_options(app.config))


def get_redis() -> Redis:
    """The current app's Redis connection."""
    return current_app.extensions["redis"]


def get_queue(name: str | None = None) -> Queue:
    """The RQ queue `name`; by default the one outbound messages go to."""
    return Queue(name or current_app.config["SEND_QUEUE"], connection=get_redis())


def get_control_queue() -> Queue:
    """The queue of campaign-level jobs: fan-out, scheduled dispatch, reconcile."""
    return get_queue(current_app.config["CONTROL_QUEUE"])
