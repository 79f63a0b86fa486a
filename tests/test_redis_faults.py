"""Redis flushed, down or stalled under real worker and scheduler processes: every campaign still
completes by itself, each message is sent once, and the scheduler outlives the fault.

Each test runs its own redis-server (tests/redis_server.py) and points the processes at it."""

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from rq_scheduler import Scheduler

from app.messaging.app_worker import live_worker_count
from app.messaging.triggers import PERIODIC_JOBS
from tests.conftest import read_send_log, wait_for
from tests.factories import make_campaign, make_customers
from tests.helpers import stats

# Short cycles, so that the bound RECONCILE_INTERVAL + STALE_AFTER is seconds, not minutes.
FAST_CYCLES = {"SCHEDULER_INTERVAL": 1, "RECONCILE_INTERVAL": 4, "STALE_AFTER": 4, "REDIS_SOCKET_TIMEOUT": 1}
# Time for the workers to drain what the reconciler queues, on a busy 2-core machine (a shared one under a
# load of 14 included); without the repair the campaigns never complete.
DRAIN_ALLOWANCE = 120


def status(client, campaign_id) -> str:
    return client.get(f"/campaigns/{campaign_id}").get_json()["status"]


def schedule_campaign(client, ids, seconds_from_now: int) -> int:
    """A campaign scheduled `seconds_from_now` ahead (whole seconds), with `ids` as its recipients."""
    at = (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).replace(microsecond=0)
    body = {"name": "Later", "channel": "sms", "base_template": "Hi {first_name}", "scheduled_at": at.isoformat()}
    campaign = client.post("/campaigns", json=body).get_json()
    response = client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    assert response.status_code == 202 and response.get_json()["status"] == "scheduled", response.get_json()
    return campaign["id"]


def stderr_of(proc) -> str:
    proc.stderr.seek(0)
    return proc.stderr.read().decode(errors="replace")


def wait_until_running(redis, workers: int) -> None:
    """Until the scheduler has registered the periodic jobs and `workers` workers wait for jobs: a
    process that starts while Redis is down exits (the platform restarts it), which is not what these
    tests are about."""
    scheduler = Scheduler(connection=redis)
    wait_for(
        lambda: all(job.job_id() in scheduler for job in PERIODIC_JOBS) and live_worker_count(redis) == workers,
        timeout=30,
    )


def assert_sent_once_each(send_log, expected: int) -> None:
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == expected
    assert [m for m, n in sends.items() if n > 1] == []


@pytest.mark.real_only
def test_flush_mid_campaign_every_campaign_completes_without_a_restart(
    app, client, private_redis, spawn_worker, spawn_scheduler, send_log
):
    env = {**FAST_CYCLES, "REDIS_URL": private_redis.url}
    app.config.update(FAST_CYCLES)
    app.extensions["redis"] = private_redis.client()
    ids = make_customers(1000)
    campaign_id = make_campaign().id
    spawn_scheduler(**env)
    for _ in range(2):
        spawn_worker(burst=False, MOCK_SENDER_LATENCY=0.005, **env)
    wait_until_running(app.extensions["redis"], workers=2)
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.get_json()["messages_queued"] == 1000
    wait_for(lambda: len(read_send_log(send_log)) >= 150, timeout=60, interval=0.05)
    scheduled_id = schedule_campaign(client, ids[:20], seconds_from_now=3)

    private_redis.client().flushall()  # queued jobs, the reconciler's schedule, the campaign's trigger
    flushed_at = time.monotonic()
    assert 0 < len(read_send_log(send_log)) < 1000

    bound = FAST_CYCLES["RECONCILE_INTERVAL"] + FAST_CYCLES["STALE_AFTER"] + FAST_CYCLES["SCHEDULER_INTERVAL"]
    wait_for(lambda: status(client, campaign_id) == status(client, scheduled_id) == "sent", bound + DRAIN_ALLOWANCE)
    assert time.monotonic() - flushed_at < bound + DRAIN_ALLOWANCE
    assert_sent_once_each(send_log, 1020)
    for cid, total in ((campaign_id, 1000), (scheduled_id, 20)):
        assert client.get(f"/campaigns/{cid}").get_json()["stats"] == stats(total=total, sent=total)


@pytest.mark.real_only
def test_scheduler_outlives_a_redis_outage_and_carries_on(app, client, private_redis, spawn_worker, spawn_scheduler):
    env = {**FAST_CYCLES, "REDIS_URL": private_redis.url}
    app.config.update(FAST_CYCLES)
    app.extensions["redis"] = private_redis.client()
    scheduler = spawn_scheduler(**env)
    spawn_worker(burst=False, **env)
    wait_until_running(app.extensions["redis"], workers=1)
    campaign_id = schedule_campaign(client, make_customers(3), seconds_from_now=2)

    private_redis.stop()  # the campaign falls due while Redis is down
    time.sleep(6)
    assert scheduler.poll() is None, stderr_of(scheduler)[-3000:]
    private_redis.start()  # empty: nothing was persisted, as after a flush

    wait_for(lambda: status(client, campaign_id) == "sent", timeout=45)
    assert scheduler.poll() is None
    log = stderr_of(scheduler)
    assert "Redis failed (ConnectionError" in log and "retrying in 1 s" in log and "retrying in 2 s" in log


@pytest.mark.real_only
def test_scheduler_outlives_a_redis_stall_past_its_socket_timeout(
    app, client, private_redis, spawn_worker, spawn_scheduler
):
    env = {**FAST_CYCLES, "REDIS_URL": private_redis.url}
    app.config.update(FAST_CYCLES)
    app.extensions["redis"] = private_redis.client()
    scheduler = spawn_scheduler(**env)
    spawn_worker(burst=False, **env)
    wait_until_running(app.extensions["redis"], workers=1)
    campaign_id = schedule_campaign(client, make_customers(3), seconds_from_now=2)

    private_redis.stall()  # answers nothing, for several socket timeouts; the campaign falls due meanwhile
    time.sleep(8)
    assert scheduler.poll() is None, stderr_of(scheduler)[-3000:]
    private_redis.resume()

    wait_for(lambda: status(client, campaign_id) == "sent", timeout=45)
    assert scheduler.poll() is None
    assert "Redis failed (TimeoutError" in stderr_of(scheduler)
