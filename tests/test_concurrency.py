"""A `worker` process keeps several sends in flight (`WORKER_CONCURRENCY` threads), and still stops the
way RQ's workers do: a warm shutdown finishes and records what is in flight (a second signal within a
second is the same request; a later one abandons the sends in flight, the metrics flushed first), `rq
suspend` starts nothing new, and a killed worker's sends in flight are sent again by the reconciler, once
each."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from rq.job import Job
from rq.suspension import resume, suspend
from sqlalchemy import select

from app import metrics
from app.extensions import db
from app.messaging.reconcile import reconcile
from app.messaging.send import window
from app.messaging.send.job import LEASE_MARGIN
from app.models import MessageStatus, OutboundMessage
from tests.conftest import kill_group, read_send_log, wait_for
from tests.factories import make_campaign, make_customers

pytestmark = pytest.mark.real_only


def send_to(client, ids: list[int]) -> int:
    campaign_id = make_campaign().id
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()
    return campaign_id


def campaign(client, campaign_id: int) -> dict:
    return client.get(f"/campaigns/{campaign_id}").get_json()


def in_flight(app, redis_conn) -> int:
    """Send jobs a worker has started and not finished (RQ's started registry)."""
    return Queue(app.config["SEND_QUEUE"], connection=redis_conn).started_job_registry.count


def sent_and_sending(client, campaign_id: int) -> tuple[int, int]:
    stats = campaign(client, campaign_id)["stats"]
    return stats["sent"], stats["sending"]


def left_unsent(app, redis_conn, campaign_id: int) -> list[tuple]:
    """The campaign's unsent messages with what Redis says of their job: what a failure reports."""
    with app.app_context():
        rows = db.session.execute(
            select(
                OutboundMessage.id, OutboundMessage.status, OutboundMessage.job_seq, OutboundMessage.updated_at
            ).where(OutboundMessage.campaign_id == campaign_id, OutboundMessage.status != MessageStatus.SENT)
        ).all()
        db.session.rollback()
    return [(*row, redis_conn.hget(Job.key_for(window.message_job_id(row.id, row.job_seq)), "status")) for row in rows]


def test_one_worker_keeps_its_concurrency_of_sends_in_flight(app, client, redis_conn, spawn_worker, send_log):
    campaign_id = send_to(client, make_customers(12))
    most = 0

    def watch() -> bool:
        nonlocal most
        most = max(most, in_flight(app, redis_conn))
        return most >= 6

    worker = spawn_worker(burst=True, WORKER_CONCURRENCY=6, MOCK_SENDER_LATENCY=1)
    wait_for(watch, timeout=30, interval=0.05)
    assert worker.wait(timeout=60) == 0, worker.stderr.read().decode()[-3000:]
    assert most == 6  # six at once, never more
    assert campaign(client, campaign_id)["stats"]["sent"] == 12
    assert sorted(Counter(a["message_id"] for a in read_send_log(send_log)).values()) == [1] * 12


def test_warm_shutdown_finishes_and_records_the_sends_in_flight(app, client, redis_conn, spawn_worker, send_log):
    campaign_id = send_to(client, make_customers(10))
    worker = spawn_worker(burst=False, WORKER_CONCURRENCY=4, MOCK_SENDER_LATENCY=2)
    wait_for(lambda: in_flight(app, redis_conn) == 4, timeout=30, interval=0.05)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.stderr.read().decode()[-3000:]

    sent = read_send_log(send_log)
    assert len(sent) == 4  # the four in flight reached the provider; nothing new was started
    detail = campaign(client, campaign_id)
    assert (detail["stats"]["sent"], detail["stats"]["queued"]) == (4, 6)  # and were recorded
    assert Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 6  # the rest still queued
    assert in_flight(app, redis_conn) == 0


def test_a_second_signal_within_a_second_is_the_same_warm_shutdown(app, client, redis_conn, spawn_worker):
    """A process manager and a terminal both signal (Ctrl-C reaches the whole group): the sends in flight
    still finish and are recorded, and the worker exits 0."""
    campaign_id = send_to(client, make_customers(4))
    worker = spawn_worker(burst=False, WORKER_CONCURRENCY=4, MOCK_SENDER_LATENCY=3)
    wait_for(lambda: in_flight(app, redis_conn) == 4, timeout=30, interval=0.05)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.stderr.read().decode()[-3000:]
    stats = campaign(client, campaign_id)["stats"]
    assert (stats["sent"], stats["pending"]) == (4, 0)


def test_a_later_second_signal_abandons_the_sends_in_flight_and_still_flushes_the_metrics(
    app, client, redis_conn, spawn_worker, send_log
):
    campaign_id = send_to(client, make_customers(4))
    # Two sends at a time, and no flush of the metrics before the worker stops.
    worker = spawn_worker(burst=False, WORKER_CONCURRENCY=2, MOCK_SENDER_LATENCY=3, METRICS_FLUSH_INTERVAL=60)
    two_sent_two_in_flight = (2, 2)
    wait_for(lambda: sent_and_sending(client, campaign_id) == two_sent_two_in_flight, timeout=30, interval=0.05)
    worker.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 1
    stats = campaign(client, campaign_id)["stats"]
    # The two in flight stay claimed by the stopped worker: their leases run out, and the reconciler sends them.
    assert (stats["sent"], stats["sending"]) == two_sent_two_in_flight
    sent = redis_conn.hget(metrics.MESSAGES.key, metrics.series_field(["sms", "mock", "sent", ""]))
    assert sent == b"2"  # counted by the worker before it stopped


def test_suspended_worker_finishes_what_is_in_flight_and_starts_nothing(
    app, client, redis_conn, spawn_worker, send_log
):
    campaign_id = send_to(client, make_customers(6))
    worker = spawn_worker(burst=False, WORKER_CONCURRENCY=2, MOCK_SENDER_LATENCY=1.5)
    wait_for(lambda: in_flight(app, redis_conn) == 2, timeout=30, interval=0.05)
    suspend(redis_conn)
    try:
        wait_for(lambda: len(read_send_log(send_log)) == 2 and in_flight(app, redis_conn) == 0, timeout=60)
        time.sleep(3)  # suspended: the four left stay queued
        assert len(read_send_log(send_log)) == 2
        assert campaign(client, campaign_id)["stats"]["queued"] == 4
    finally:
        resume(redis_conn)
    wait_for(lambda: campaign(client, campaign_id)["status"] == "sent", timeout=30)
    assert worker.poll() is None  # still working, not stopped by the suspension
    assert sorted(Counter(a["message_id"] for a in read_send_log(send_log)).values()) == [1] * 6


def test_killed_worker_sends_in_flight_are_sent_again_once_by_the_reconciler(
    app, client, clock, redis_conn, spawn_worker, send_log
):
    campaign_id = send_to(client, make_customers(40))
    victim = spawn_worker(burst=False, WORKER_CONCURRENCY=4, MOCK_SENDER_LATENCY=0.3)
    wait_for(lambda: len(read_send_log(send_log)) >= 8, timeout=30, interval=0.05)
    kill_group(victim, signal.SIGKILL)
    assert 0 < campaign(client, campaign_id)["stats"]["sent"] < 40

    # The test waits neither for the claims' leases nor five minutes for jobs taken and never claimed.
    app.config["STALE_AFTER"] = 0
    clock.current = datetime.now(UTC) + timedelta(seconds=app.config["JOB_TIMEOUT"] + LEASE_MARGIN + 1)
    # The reconciler passes as it does in service, a second apart, each followed by a burst drain: what one
    # pass put back in line and its drain left (a job handed back for later, say) is the next pass's.
    for _ in range(5):
        reconcile()
        drain = spawn_worker(burst=True)
        assert drain.wait(timeout=120) == 0, drain.stderr.read().decode()[-3000:]
        detail = campaign(client, campaign_id)
        if detail["status"] == "sent":
            break
        clock.current += timedelta(seconds=1)
    assert (detail["status"], detail["stats"]["sent"]) == ("sent", 40), left_unsent(app, redis_conn, campaign_id)
    attempts = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(attempts) == 40
    twice = [m for m, n in attempts.items() if n > 1]
    assert len(twice) <= 4 and max(attempts.values()) <= 2  # only the four in flight may reach it again
