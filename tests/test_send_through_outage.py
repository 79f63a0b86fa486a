"""PostgreSQL goes away while a worker is sending: the provider has the message, the record of it fails.
A short outage is waited out (the message is sent once and recorded); during a longer one the record waits
in Redis and is applied when the database returns: the message is sent once either way.
A private cluster and real worker processes."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
from rq.job import Job
from sqlalchemy import select

from app.extensions import db
from app.messaging import spool
from app.messaging.reconcile import reconcile
from app.messaging.send.job import LEASE_MARGIN
from app.messaging.send.window import message_job_id
from app.models import Campaign, OutboundMessage
from tests.conftest import TEST_API_KEY, kill_group, read_send_log
from tests.factories import make_campaign, make_customers
from tests.pg_server import wait_until

pytestmark = pytest.mark.real_only

PROVIDER_LATENCY = 2  # seconds the mock provider takes: the database is stopped meanwhile


def start_sending_one(app) -> tuple[int, int]:
    """Send a new campaign to one customer; returns (message id, campaign id)."""
    ids = make_customers(1)
    campaign_id = make_campaign().id
    response = app.test_client().post(
        f"/campaigns/{campaign_id}/send",
        json={"customer_ids": ids},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    )
    assert response.status_code == 202, response.get_json()
    message_id = db.session.scalar(select(OutboundMessage.id).where(OutboundMessage.campaign_id == campaign_id))
    db.session.commit()
    return message_id, campaign_id


def stop_database_mid_send(pg_server, redis_conn, message_id: int) -> None:
    """Stop the cluster while the worker waits for the provider: the message is loaded, not recorded."""
    job_key = Job.key_for(message_job_id(message_id, 1))
    wait_until(lambda: redis_conn.hget(job_key, "status") == b"started", timeout=30)
    time.sleep(PROVIDER_LATENCY / 4)
    pg_server.stop()


def statuses(message_id: int, campaign_id: int) -> tuple[str, str]:
    """The message's and the campaign's status, read on a new connection (the old ones died)."""
    db.session.remove()
    db.engine.dispose()
    return db.session.get(OutboundMessage, message_id).status, db.session.get(Campaign, campaign_id).status


def test_outage_shorter_than_the_record_window_sends_once(
    private_app, private_database, pg_server, spawn_worker, redis_conn, send_log
):
    message_id, campaign_id = start_sending_one(private_app)
    worker = spawn_worker(DATABASE_URL=private_database, MOCK_SENDER_LATENCY=PROVIDER_LATENCY, RECORD_RETRY_WINDOW=20)
    stop_database_mid_send(pg_server, redis_conn, message_id)
    time.sleep(PROVIDER_LATENCY + 2)  # the provider accepts; recording fails, and fails again
    pg_server.start()
    assert worker.wait(timeout=60) == 0
    assert statuses(message_id, campaign_id) == ("sent", "sent")
    attempts = read_send_log(send_log)
    assert [(a["message_id"], a["ok"]) for a in attempts] == [(message_id, True)]
    assert "could not record a send attempt; trying again" in worker.stderr.read().decode()


def test_outage_longer_than_the_record_window_keeps_the_record_in_redis_and_sends_once(
    private_app, private_database, pg_server, spawn_worker, redis_conn, send_log
):
    message_id, campaign_id = start_sending_one(private_app)
    worker = spawn_worker(
        burst=False, DATABASE_URL=private_database, MOCK_SENDER_LATENCY=PROVIDER_LATENCY, RECORD_RETRY_WINDOW=1
    )
    stop_database_mid_send(pg_server, redis_conn, message_id)
    # The provider took it; the database cannot take its record: the record waits in Redis.
    wait_until(lambda: redis_conn.llen(spool.OUTCOMES_KEY) == 1, timeout=30)
    time.sleep(5)  # a long outage: the record window (1 s) is long gone
    pg_server.start()
    # The worker's drainer applies the record within a second or so of the database's return.
    try:
        wait_until(lambda: statuses(message_id, campaign_id) == ("sent", "sent"), timeout=60)
    except AssertionError:
        kill_group(worker, signal.SIGTERM)
        raise AssertionError(worker.stderr.read().decode()[-6000:]) from None
    wait_until(lambda: redis_conn.llen(spool.OUTCOMES_KEY) == 0, timeout=60)  # taken off once applied
    attempts = read_send_log(send_log)
    assert [(a["message_id"], a["ok"]) for a in attempts] == [(message_id, True)]  # sent once
    kill_group(worker, signal.SIGTERM)
    logged = worker.stderr.read().decode()
    assert "the database is unavailable: the send's record waits in Redis" in logged


def test_the_reconciler_applies_a_kept_record_before_it_releases_the_claim(
    private_app, private_database, pg_server, spawn_worker, redis_conn, send_log, clock
):
    """No worker is left to drain (the one that sent was stopped), and the claim's lease has run out by the
    time the database returns: the reconciler applies the record first, and does not send it again."""
    message_id, campaign_id = start_sending_one(private_app)
    worker = spawn_worker(DATABASE_URL=private_database, MOCK_SENDER_LATENCY=PROVIDER_LATENCY, RECORD_RETRY_WINDOW=1)
    stop_database_mid_send(pg_server, redis_conn, message_id)
    assert worker.wait(timeout=60) == 0
    assert redis_conn.llen(spool.OUTCOMES_KEY) == 1
    pg_server.start()
    db.session.remove()
    db.engine.dispose()
    clock.current = datetime.now(UTC) + timedelta(seconds=private_app.config["JOB_TIMEOUT"] + LEASE_MARGIN + 1)
    report = reconcile()
    assert (report.applied_deferred, report.in_doubt) == (1, 0)
    assert statuses(message_id, campaign_id) == ("sent", "sent")
    assert len(read_send_log(send_log)) == 1
