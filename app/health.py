"""`GET /health`: the state of the database, Redis, the queues and the workers, for load balancers
and operators. Needs no API key; 503 when the database or Redis is down."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def _check(name: str, probe: Callable[[], object]) -> dict:
    try:
        probe()
    except Exception:  # noqa: BLE001 - any failure means down; the log has the details, the client does not
        log.warning("health check failed", extra={"dependency": name}, exc_info=True)
        return {"ok": False, "error": f"{name} unreachable"}
    return {"ok": True}


# /health answers within 2 s even when the database hangs: the database probe gets this long.
DATABASE_PROBE_TIMEOUT = 1.5
# Probes run here, so that the answer need not wait for a connection attempt (at least 2 s in libpq) to
# give up. Two threads: a probe stuck on a hung database holds one for a few seconds at most.
_probes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health-probe")


def _probe_database(app: Flask) -> None:
    with app.app_context(), round_trip_budget(DATABASE_PROBE_TIMEOUT):
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _ping_database() -> None:
    """`SELECT 1`, answered within `DATABASE_PROBE_TIMEOUT` seconds or counted as down."""
    probe = _probes.submit(_probe_database, current_app._get_current_object())
    try:
        probe.result(timeout=DATABASE_PROBE_TIMEOUT)
    except ProbeTimeout:
        probe.cancel()  # still queued behind a stuck probe: it need not run at all
        raise TimeoutError(f"no answer from the database within {DATABASE_PROBE_TIMEOUT} s") from None


def service_health() -> dict:
    """The state of each dependency; `status` is `ok` only when the database and Redis both answer."""
    redis = get_redis()
    state = {"database": _check("database", _ping_database), "redis": _check("redis", redis.ping)}
    queue_depth = workers = None
    if state["redis"]["ok"]:
        try:
            queue_depth = sum(Queue(name, connection=redis).count for name in current_app.config["QUEUES"])
            workers = live_worker_count(redis)
        except Exception:  # noqa: BLE001 - Redis went away between the ping and the counts
            log.warning("health: could not count queues or workers", exc_info=True)
    ok = state["database"]["ok"] and state["redis"]["ok"]
    return {"status": "ok" if ok else "unavailable", **state, "queue_depth": queue_depth, "workers": workers}


@bp.route("/health", endpoint="health")
class Health(MethodView):
    @bp.doc(security=[])
    @bp.response(200, HealthSchema)
    @bp.alt_response(503, schema=HealthSchema, description="The database or Redis is down")
    def get(self):
        """Health of the service and its dependencies (no API key needed)"""
        health = service_health()
        return health, 200 if health["status"] == "ok" else 503
