"""The app's Redis connection and the RQ queues jobs go to."""

from __future__ import annotations

from flask import Flask, current_app
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from rq import Queue


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


def init_redis(app: Flask) -> None:
    """Open the app's Redis connection, failing fast (`redis_options`), unless one was given (tests pass
    fakeredis). A worker gives RQ a connection of its own (`app_worker.build_worker`), whose socket timeout
    RQ raises above its blocking wait for a job; the jobs keep this one."""
    if "redis" not in app.extensions:
        app.extensions["redis"] = Redis.from_url(app.config["REDIS_URL"], **redis_options(app.config))


def get_redis() -> Redis:
    """The current app's Redis connection."""
    return current_app.extensions["redis"]


def get_queue(name: str | None = None) -> Queue:
    """The RQ queue `name`; by default the one outbound messages go to."""
    return Queue(name or current_app.config["SEND_QUEUE"], connection=get_redis())


def get_control_queue() -> Queue:
    """The queue of campaign-level jobs: fan-out, scheduled dispatch, reconcile, imports."""
    return get_queue(current_app.config["CONTROL_QUEUE"])
