"""`GET /health`: the state of the database, Redis, the queues, the workers and the scheduled jobs, for
load balancers and operators. Needs no API key; 503 when the database or Redis is down."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as ProbeTimeout

from flask import Flask, current_app
from flask.views import MethodView
from marshmallow import Schema, fields
from rq import Queue
from sqlalchemy import text

from app.blueprint import Blueprint
from app.database import round_trip_budget
from app.extensions import db
from app.messaging.app_worker import live_worker_count
from app.messaging.scheduled_jobs import overdue_counts
from app.queues import get_redis

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__, description="Service health")


class DependencySchema(Schema):
    ok = fields.Boolean(required=True)
    error = fields.String(metadata={"description": "Why it is not ok (no internals)."})


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "unavailable"]})
    database = fields.Nested(DependencySchema, required=True)
    redis = fields.Nested(DependencySchema, required=True)
    queue_depth = fields.Integer(
        required=True, allow_none=True, metadata={"description": "Jobs waiting in the worker's queues."}
    )
    workers = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Workers whose last heartbeat is recent enough that they are alive."},
    )
    overdue_scheduled_jobs = fields.Integer(
        required=True,
        allow_none=True,
        metadata={
            "description": "Jobs waiting in RQ's schedule (retries, postponed sends) that fell due over 30 s ago and "
            "are still not back on their queue: 0 unless no worker runs, or they cannot keep up."
        },
    )


# /health answers within 2 s even when the database hangs: the database probe gets this long.
DATABASE_PROBE_TIMEOUT = 1.5
# And Redis is reported down in under a second, stalled or gone: its probe (the ping and the counts) gets
# this long, less than the web's REDIS_SOCKET_TIMEOUT (1 s), after which a stalled read would give up.
REDIS_PROBE_TIMEOUT = 0.8
# The probes run here, both at once, so that the answer need not wait for a connection attempt (at least
# 2 s in libpq) or a stalled read to give up, nor for one probe before the other. Two threads per
# dependency, apart, so that probes stuck on a hung Redis never delay the database's (or the reverse): a
# stuck probe holds its thread for a few seconds at most.
_probes = {
    name: ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"health-{name}") for name in ("database", "redis")
}


def _probe_database(app: Flask) -> None:
    """`SELECT 1`."""
    with app.app_context(), round_trip_budget(DATABASE_PROBE_TIMEOUT):
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _probe_redis(app: Flask) -> tuple[int, int, int]:
    """A ping, then the jobs waiting in the worker's queues, the live workers and the overdue scheduled jobs."""
    with app.app_context():
        redis = get_redis()
        redis.ping()
        queue_depth = sum(Queue(name, connection=redis).count for name in app.config["QUEUES"])
        overdue = sum(overdue_counts(redis, app.config["QUEUES"]).values())
        return queue_depth, live_worker_count(redis), overdue


def _outcome(name: str, probe: Future, timeout: float) -> tuple[dict, object]:
    """The dependency's state and what its probe returned (None when it failed or took longer than
    `timeout` seconds: it counts as down; the log has the details, the client does not)."""
    try:
        result = probe.result(timeout=timeout)
    except ProbeTimeout:
        probe.cancel()  # still queued behind a stuck probe: it need not run at all
        log.warning("health check failed", extra={"dependency": name, "reason": f"no answer within {timeout} s"})
    except Exception:  # noqa: BLE001 - any failure means down
        log.warning("health check failed", extra={"dependency": name}, exc_info=True)
    else:
        return {"ok": True}, result
    return {"ok": False, "error": f"{name} unreachable"}, None


def service_health() -> dict:
    """The state of each dependency; `status` is `ok` only when the database and Redis both answer."""
    app = current_app._get_current_object()
    started = time.monotonic()
    database = _probes["database"].submit(_probe_database, app)
    redis = _probes["redis"].submit(_probe_redis, app)

    def left(budget: float) -> float:  # both budgets count from the same start: the probes run at once
        return max(0.0, budget - (time.monotonic() - started))

    database_state, _ = _outcome("database", database, left(DATABASE_PROBE_TIMEOUT))
    redis_state, counts = _outcome("redis", redis, left(REDIS_PROBE_TIMEOUT))
    queue_depth, workers, overdue = counts or (None, None, None)
    ok = database_state["ok"] and redis_state["ok"]
    return {
        "status": "ok" if ok else "unavailable",
        "database": database_state,
        "redis": redis_state,
        "queue_depth": queue_depth,
        "workers": workers,
        "overdue_scheduled_jobs": overdue,
    }


@bp.route("/health", endpoint="health")
class Health(MethodView):
    @bp.doc(security=[])
    @bp.response(200, HealthSchema)
    @bp.alt_response(503, schema=HealthSchema, description="The database or Redis is down")
    def get(self):
        """Health of the service and its dependencies (no API key needed)"""
        health = service_health()
        return health, 200 if health["status"] == "ok" else 503
