"""Jobs waiting in RQ's scheduled registry (retries after RETRY_INTERVALS, throttle hand-backs, postponements)
go back onto their queue within a few seconds of their time, whichever worker process is alive: after a
worker is killed, and after Redis is restarted."""

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from rq import Queue, Retry
from rq.job import Job
from rq.rate_limit import RateLimit
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler

from app.messaging.app_worker import build_worker, live_worker_count
from app.messaging.scheduled_jobs import move_due_jobs
from tests.conftest import TEST_REDIS_URL, kill_group, read_send_log, wait_for
from tests.factories import make_campaign, make_customers

# Seconds before a failed send is tried again, in these tests.
RETRY_DELAY = 4
# The promise (docs/operations.md): a due job is back on its queue within its delay + 5 s.
BOUND = 5
# Room for a loaded 2-core machine and the registry's whole-second scores (a job due at 12.7 s is scored 12).
SLACK = 1.5
RETRIES = {"RETRY_INTERVALS": f"{RETRY_DELAY},{RETRY_DELAY},{RETRY_DELAY}", "MOCK_SENDER_FAIL_ATTEMPTS": 1}


def lateness(registry: ScheduledJobRegistry, deadline: float) -> dict[str, float]:
    """Watch the registry until it is empty or `deadline` (Unix time): for each job waiting in it now, the
    seconds from its due time to when it left (for the queue); those still waiting at the deadline are left out."""
    due = {job_id.decode(): score for job_id, score in registry.connection.zrange(registry.key, 0, -1, withscores=True)}
    left: dict[str, float] = {}
    while len(left) < len(due) and time.time() < deadline:
        waiting = {job_id.decode() for job_id in registry.connection.zrange(registry.key, 0, -1)}
        now = time.time()
        for job_id, score in due.items():
            if job_id not in waiting and job_id not in left:
                left[job_id] = now - score
        time.sleep(0.1)
    return left


def failed_first_attempts(send_log) -> int:
    return sum(1 for attempt in read_send_log(send_log) if not attempt["ok"])


@pytest.mark.real_only
def test_retries_go_back_on_time_after_the_worker_moving_them_is_killed(
    app, client, redis_conn, spawn_worker, send_log
):
    """Two workers; the first started first (RQ's scheduler in it held the queues' lock, for 61 s after a
    SIGKILL). Killed while 200 retries wait a few seconds ahead: the other moves each on time."""
    first = spawn_worker(burst=False, **RETRIES)
    wait_for(lambda: live_worker_count(redis_conn) == 1, timeout=30)
    spawn_worker(burst=False, **RETRIES)
    wait_for(lambda: live_worker_count(redis_conn) == 2, timeout=30)
    ids = make_customers(200)
    campaign_id = make_campaign().id
    client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    started = StartedJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    # Every first attempt failed and its retry is scheduled: none is in flight in the worker about to die.
    wait_for(lambda: failed_first_attempts(send_log) == 200 and started.count == 0, timeout=30, interval=0.05)
    kill_group(first)
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    assert registry.count > 0  # some retries are still ahead of their time

    late = lateness(registry, deadline=time.time() + RETRY_DELAY + BOUND + SLACK + 5)
    assert registry.count == 0, f"{registry.count} retries still waiting; moved ones were late by up to {late}"
    assert max(late.values()) <= BOUND + SLACK, sorted(late.values())[-5:]
    wait_for(lambda: client.get(f"/campaigns/{campaign_id}").get_json()["status"] == "sent", timeout=60)
    sent = [attempt["message_id"] for attempt in read_send_log(send_log) if attempt["ok"]]
    assert len(sent) == len(set(sent)) == 200


@pytest.mark.real_only
def test_retries_go_back_on_time_after_redis_is_restarted(app, client, private_redis, spawn_worker, send_log):
    """Redis stopped under a running worker (its scheduling fails), then started again empty: the retries of a
    campaign sent after that still go back on time, without a worker restart."""
    env = {**RETRIES, "REDIS_URL": private_redis.url}
    app.extensions["redis"] = redis = private_redis.client()
    worker = spawn_worker(burst=False, **env)
    wait_for(lambda: live_worker_count(redis) == 1, timeout=30)
    private_redis.stop()
    time.sleep(3)  # a few failed passes
    private_redis.start()
    wait_for(lambda: live_worker_count(redis) == 1, timeout=40)  # it heartbeats again

    ids = make_customers(20)
    campaign_id = make_campaign().id
    client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    wait_for(lambda: failed_first_attempts(send_log) == 20, timeout=30, interval=0.05)
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis)
    late = lateness(registry, deadline=time.time() + RETRY_DELAY + BOUND + SLACK + 5)
    assert registry.count == 0, f"{registry.count} retries still waiting; moved ones were late by up to {late}"
    assert max(late.values()) <= BOUND + SLACK, sorted(late.values())[-5:]
    wait_for(lambda: client.get(f"/campaigns/{campaign_id}").get_json()["status"] == "sent", timeout=30)
    assert worker.poll() is None
    worker.stderr.seek(0)
    log = worker.stderr.read().decode()
    assert log.count("scheduled jobs: Redis failed (ConnectionError") == 1  # once an outage; it tried every second


def noop(*args) -> None:
    """A job that does nothing."""


def schedule_twins(queue: Queue, past: datetime) -> None:
    """One of each kind of scheduled job, with ids `<queue>-<kind>`: the same kinds in any queue."""
    name = queue.name
    queue.enqueue_at(past, noop, 1, job_id=f"{name}-plain", job_timeout=30)
    queue.enqueue_at(past, noop, 2, job_id=f"{name}-no-timeout")
    queue.enqueue_at(past, noop, 3, job_id=f"{name}-ttl", ttl=500)
    retried = queue.enqueue_at(past, noop, 4, job_id=f"{name}-retry", retry=Retry(max=2, enqueue_at_front=True))
    retried.ended_at = past  # it ran once: its retry goes to the front
    retried.save()
    front = queue.enqueue_at(past, noop, 5, job_id=f"{name}-front")
    front.enqueue_at_front = True
    front.save()
    for n in (1, 2):  # one slot: the first is queued, the second waits for it
        queue.enqueue_at(past, noop, 6, job_id=f"{name}-limited-{n}", rate_limit=RateLimit(f"{name}-limit", 1))
    queue.enqueue_at(past + timedelta(hours=2), noop, 7, job_id=f"{name}-later")
    queue.connection.zadd(ScheduledJobRegistry(queue=queue).key, {f"{name}-deleted": past.timestamp()})


def moved_state(queue: Queue) -> dict:
    """What a move left: the queue's ids, the registry's, and each job's hash (fields that name the queue
    or the moment compared apart) and TTL, by kind."""
    connection, name = queue.connection, queue.name

    def kind(job_id: bytes) -> str:
        return job_id.decode().removeprefix(f"{name}-")

    jobs = {}
    for key in connection.scan_iter(f"{Job.redis_job_namespace_prefix}{name}-*"):
        fields = {k.decode(): v for k, v in connection.hgetall(key).items()}
        assert fields.pop("origin") == name.encode()
        for moment in ("created_at", "enqueued_at"):
            fields.pop(moment, None)
        fields.pop("rate_limit_key", None)
        ttl = connection.ttl(key)  # -1: none; else in tens of seconds (the two moves are moments apart)
        job_id = key.removeprefix(Job.redis_job_namespace_prefix.encode())
        jobs[kind(job_id)] = (fields, ttl if ttl < 0 else (ttl + 5) // 10)
    return {
        "queued": [kind(i) for i in connection.lrange(queue.key, 0, -1)],
        "waiting": [kind(i) for i in connection.zrange(ScheduledJobRegistry(queue=queue).key, 0, -1)],
        "jobs": jobs,
    }


@pytest.mark.real_only
def test_a_due_job_is_queued_as_rq_s_own_scheduler_queues_it(redis_conn):
    """The move is written against RQ 3.0.0's (`Queue._enqueue_job` through `RQScheduler`): the same jobs,
    moved by each, end the same at the installed version."""
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    by_rq, by_mover = Queue("by_rq", connection=redis_conn), Queue("by_mover", connection=redis_conn)
    for queue in (by_rq, by_mover):
        schedule_twins(queue, past)
    scheduler = RQScheduler([by_rq.name], connection=redis_conn)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    scheduler.release_locks()
    assert move_due_jobs(redis_conn, [by_mover.name]) == 7

    expected = moved_state(by_rq)
    assert expected["queued"] == ["retry", "front", "no-timeout", "plain", "ttl", "limited-1"]  # retries first
    assert expected["waiting"] == ["later"]
    assert moved_state(by_mover) == expected


@pytest.mark.real_only
def test_movers_at_once_queue_each_due_job_once(redis_conn):
    queue = Queue("many", connection=redis_conn)
    past = datetime.now(UTC) - timedelta(seconds=5)
    with redis_conn.pipeline() as pipe:
        for n in range(2500):  # more than one script call's batch
            queue.schedule_job(queue.create_job(noop, args=(n,), job_id=f"many-{n}"), past, pipeline=pipe)
        pipe.execute()
    moved, barrier = [], threading.Barrier(4)

    def move() -> None:
        connection = Redis.from_url(TEST_REDIS_URL)
        barrier.wait()
        moved.append(move_due_jobs(connection, [queue.name]))
        connection.close()

    movers = [threading.Thread(target=move) for _ in range(4)]
    for mover in movers:
        mover.start()
    for mover in movers:
        mover.join()
    queued = redis_conn.lrange(queue.key, 0, -1)
    assert len(queued) == len(set(queued)) == sum(moved) == 2500
    assert ScheduledJobRegistry(queue=queue).count == 0


def test_the_worker_will_not_run_rq_s_scheduler_beside_the_mover(app):
    with pytest.raises(ValueError, match="without RQ's scheduler"):
        build_worker(app).work(burst=True, with_scheduler=True)
