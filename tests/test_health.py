"""GET /health: the database, Redis, queue depth and workers; 503 when a dependency is down."""

import contextlib
import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from rq import Queue

from app import create_app
from app.extensions import db
from app.messaging.app_worker import LIVENESS_GRACE, build_worker
from app.queues import redis_options
from tests.conftest import TEST_OVERRIDES, kill_group, wait_for
from tests.factories import make_campaign, make_customers
from tests.redis_server import unanswering_port

CLOSED_PORT = 1  # nothing listens there: connections are refused at once


def test_healthy_service(anonymous_client):
    response = anonymous_client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "database": {"ok": True},
        "redis": {"ok": True},
        "queue_depth": 0,
        "workers": 0,
        "overdue_scheduled_jobs": 0,
    }


def test_reports_queue_depth_and_live_workers(app, client, anonymous_client):
    ids = make_customers(3)
    client.post(f"/campaigns/{make_campaign().id}/send", json={"customer_ids": ids})
    worker = build_worker(app)
    worker.register_birth()
    worker.heartbeat()  # what a worker does before it waits for a job
    try:
        body = anonymous_client.get("/health").get_json()
    finally:
        worker.register_death()
    assert body["queue_depth"] == 3
    assert body["workers"] == 1
    assert anonymous_client.get("/health").get_json()["workers"] == 0  # a clean exit leaves at once


def test_counts_the_scheduled_jobs_due_more_than_thirty_seconds_ago(app, redis_conn, anonymous_client):
    """A retry or a hand-back that no worker moved back to its queue in time: operators should see it."""
    now = datetime.now(UTC)
    for queue_name, seconds_ago in (("SEND_QUEUE", 95), ("CONTROL_QUEUE", 32), ("SEND_QUEUE", 10), ("SEND_QUEUE", -60)):
        Queue(app.config[queue_name], connection=redis_conn).enqueue_at(now - timedelta(seconds=seconds_ago), print)
    assert anonymous_client.get("/health").get_json()["overdue_scheduled_jobs"] == 2


def test_redis_down_is_503(app, anonymous_client):
    app.extensions["redis"] = Redis(port=CLOSED_PORT, **redis_options(app.config))
    response = anonymous_client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["database"] == {"ok": True}
    assert body["redis"] == {"ok": False, "error": "redis unreachable"}
    assert body["queue_depth"] is None and body["workers"] is None and body["overdue_scheduled_jobs"] is None


def test_database_down_is_503_and_shows_no_internals(app, redis_conn, tmp_path):
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite"):
        down = f"sqlite:///{tmp_path}/missing-dir/db.sqlite"
    else:
        down = f"postgresql+psycopg://postgres@127.0.0.1:{CLOSED_PORT}/campaigns"
    broken = create_app("config.Config", {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": down})
    broken.extensions["redis"] = redis_conn
    try:
        response = broken.test_client().get("/health")
    finally:
        with broken.app_context():
            db.engine.dispose()
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == {"ok": False, "error": "database unreachable"}
    assert body["redis"] == {"ok": True}
    assert "missing-dir" not in response.get_data(as_text=True)
    assert str(CLOSED_PORT) + "/" not in response.get_data(as_text=True)


def health_of(app, redis_url: str, **settings):
    """/health of an app whose Redis connection is built from `redis_url` as the web builds it; returns
    the response and how long it took."""
    web = create_app(
        "config.Config",
        {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"], "REDIS_URL": redis_url}
        | settings,
    )
    try:
        started = time.monotonic()
        response = web.test_client().get("/health")
        return response, time.monotonic() - started
    finally:
        with web.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("down", ["refused", "host unreachable"])
def test_redis_down_is_reported_in_under_a_second(app, down):
    with contextlib.ExitStack() as stack:
        port = CLOSED_PORT if down == "refused" else stack.enter_context(unanswering_port())
        response, took = health_of(app, f"redis://127.0.0.1:{port}/0")
    assert response.status_code == 503
    assert response.get_json()["redis"] == {"ok": False, "error": "redis unreachable"}
    assert took < 1.0


@pytest.mark.real_only
def test_stalled_redis_is_reported_within_the_socket_timeout(app, private_redis):
    private_redis.stall()
    try:
        response, took = health_of(app, private_redis.url, REDIS_SOCKET_TIMEOUT=0.5)
    finally:
        private_redis.resume()
    assert response.status_code == 503
    assert response.get_json()["redis"] == {"ok": False, "error": "redis unreachable"}
    assert took < 0.5 + 1.5


@pytest.mark.real_only
def test_stalled_redis_is_reported_in_under_a_second_with_the_default_timeouts(app, private_redis):
    """A Redis that accepts connections and never answers (stopped with SIGSTOP): reported down within
    the health probe's own budget, not after the web's 1 s socket timeout and the counts after it."""
    private_redis.stall()
    try:
        response, took = health_of(app, private_redis.url)
    finally:
        private_redis.resume()
    assert response.status_code == 503
    assert response.get_json()["redis"] == {"ok": False, "error": "redis unreachable"}
    assert response.get_json()["database"] == {"ok": True}
    assert took < 1.0


@pytest.mark.real_only
def test_hung_database_and_stalled_redis_together_answer_within_two_seconds(app, private_redis):
    """Both probes run at once: the answer takes the longer budget, not the sum."""
    private_redis.stall()
    try:
        with unanswering_port() as port:
            response, took = health_of(
                app,
                private_redis.url,
                SQLALCHEMY_DATABASE_URI=f"postgresql+psycopg://postgres@127.0.0.1:{port}/campaigns",
            )
    finally:
        private_redis.resume()
    assert response.status_code == 503
    body = response.get_json()
    assert body["redis"]["ok"] is False and body["database"]["ok"] is False
    assert took < 2.0


@pytest.mark.real_only
def test_health_counts_only_live_workers_and_sees_them_again_after_a_flush(
    app, anonymous_client, redis_conn, spawn_worker
):
    interval = 1
    workers = [spawn_worker(burst=False, WORKER_HEARTBEAT_INTERVAL=interval) for _ in range(3)]

    def live() -> int:
        return anonymous_client.get("/health").get_json()["workers"]

    wait_for(lambda: live() == 3, timeout=30)
    for victim in workers[:2]:
        kill_group(victim, signal.SIGKILL)  # no clean exit: they stay registered in RQ's own set
    window = interval + LIVENESS_GRACE
    wait_for(lambda: live() == 1, timeout=window + 3)

    redis_conn.flushdb()
    wait_for(lambda: live() == 1, timeout=interval + 3)  # the survivor's next heartbeat
    assert workers[2].poll() is None
