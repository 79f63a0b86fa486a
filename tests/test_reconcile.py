"""Self-healing: PostgreSQL is the truth; Redis may lose everything and every message still goes out once."""

import signal
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue

from app.extensions import db
from app.messaging.app_worker import build_worker
from app.messaging.reconcile import reconcile
from app.messaging.send.job import LEASE_MARGIN
from app.messaging.triggers import PERIODIC_JOBS, get_scheduler, register_periodic_jobs, restore_periodic_jobs
from app.models import Campaign
from tests.conftest import kill_group, read_send_log, wait_for
from tests.factories import make_campaign, make_customers
from tests.helpers import stats as expected_stats


def stats(client, campaign_id):
    return client.get(f"/campaigns/{campaign_id}").get_json()


def send_to(client, campaign_id, ids):
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()


def test_redis_flushed_mid_campaign_every_message_sent_once(app, client, clock, redis_conn, work, send_log):
    ids = make_customers(300)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    build_worker(app).work(burst=True, max_jobs=100, logging_level="WARNING")
    db.session.rollback()
    assert stats(client, campaign.id)["stats"]["sent"] == 100
    redis_conn.flushdb()  # every queued job is gone
    work()
    assert stats(client, campaign.id)["stats"]["queued"] == 200  # nothing left to run them

    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    report = reconcile()
    assert report.requeued == 200
    work()
    detail = stats(client, campaign.id)
    assert detail["status"] == "sent"
    assert detail["stats"] == expected_stats(total=300, sent=300)
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 300 and set(sends.values()) == {1}


# A web process that commits a send and is killed before it enqueues a single job.
SEND_THEN_DIE = """
import os, signal, sys
from app import create_app
from app.campaigns import service
from app.messaging.send import window

die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
window.refill = die
with create_app().app_context():
    service.send_campaign(int(sys.argv[1]), customer_ids=[int(i) for i in sys.argv[2:]])
"""


@pytest.mark.real_only
def test_crash_between_commit_and_enqueue_is_healed(app, client, clock, spawn, work, send_log, redis_conn):
    ids = make_customers(5)
    campaign = make_campaign()
    clock.current = datetime.now(UTC)
    web = spawn(["-c", SEND_THEN_DIE, str(campaign.id), *map(str, ids)])
    assert web.wait(timeout=60) == -signal.SIGKILL, web.stderr.read().decode()[-2000:]
    assert Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    work()
    assert stats(client, campaign.id)["stats"]["pending"] == 5  # waiting for a window that never came

    assert reconcile().refilled == 5  # the next pass queues them: the rows say they wait
    work()
    assert stats(client, campaign.id)["status"] == "sent"
    assert len(read_send_log(send_log)) == 5


def test_jobs_still_waiting_in_redis_are_not_duplicated(app, client, clock, redis_conn, send_queue):
    ids = make_customers(4)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 0
    assert send_queue.count == 4


def test_requeued_messages_are_not_requeued_again_before_they_are_stale(app, client, clock, redis_conn):
    ids = make_customers(3)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    redis_conn.flushdb()
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 3
    redis_conn.flushdb()
    assert reconcile().requeued == 0
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 3


def test_retries_left_carry_over_to_a_requeued_message(app, client, clock, redis_conn, work, send_log):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 99
    app.config["RETRY_INTERVALS"] = [3600]  # the retry waits in Redis...
    ids = make_customers(1)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    work()
    redis_conn.flushdb()  # ...and is lost
    app.config["RETRY_INTERVALS"] = [0]
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 1
    work()
    [message] = client.get(f"/campaigns/{campaign.id}/messages").get_json()["data"]
    assert (message["status"], message["retry_count"]) == ("failed", 3)
    assert len(read_send_log(send_log)) == 4  # still at most four attempts in all


def test_due_campaign_whose_trigger_was_lost_is_dispatched(app, client, clock, redis_conn, work):
    ids = make_customers(3)
    body = {"name": "Later", "channel": "sms", "base_template": "Hi {first_name}"}
    at = clock.now() + timedelta(minutes=10)
    campaign = client.post("/campaigns", json={**body, "scheduled_at": at.isoformat()}).get_json()
    send_to(client, campaign["id"], ids)
    redis_conn.flushdb()  # the schedule is gone
    clock.advance(minutes=9)
    assert reconcile().dispatched == []  # never before its time
    clock.advance(minutes=1)
    assert reconcile().dispatched == [campaign["id"]]
    assert reconcile().dispatched == []
    work()
    assert stats(client, campaign["id"])["stats"]["sent"] == 3


def test_sending_campaign_with_nothing_pending_is_finalized(app, client, work):
    ids = make_customers(2)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    work()
    # As if the worker died between the last message's commit and the completion step.
    db.session.execute(db.update(Campaign).values(status="sending"))
    db.session.commit()
    assert reconcile().finalized == {campaign.id: "sent"}
    assert stats(client, campaign.id)["status"] == "sent"


def test_reconcile_runs_as_a_job(app, client, clock, redis_conn, work, control_queue):
    ids = make_customers(2)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    redis_conn.flushdb()
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    control_queue.enqueue("app.messaging.jobs.periodic_reconcile")  # where the scheduler puts it
    work()  # the reconcile job, then the two send jobs it queued
    assert stats(client, campaign.id)["status"] == "sent"


def periodic(scheduler) -> dict[str, int]:
    """The periodic jobs rq-scheduler holds: function -> interval."""
    return {job.func_name: job.meta["interval"] for job in scheduler.get_jobs()}


def test_registering_the_periodic_jobs_twice_keeps_one_of_each(app, redis_conn):
    scheduler = get_scheduler()
    register_periodic_jobs(scheduler)
    register_periodic_jobs(scheduler)
    assert sorted(job.id for job in scheduler.get_jobs()) == sorted(job.job_id() for job in PERIODIC_JOBS)
    assert periodic(scheduler) == {
        "app.messaging.jobs.periodic_reconcile": app.config["RECONCILE_INTERVAL"],
        "app.idempotency.purge_expired": app.config["IDEMPOTENCY_PURGE_INTERVAL"],
    }


def test_a_new_interval_replaces_the_old_periodic_job(app, redis_conn):
    scheduler = get_scheduler()
    register_periodic_jobs(scheduler)
    app.config["RECONCILE_INTERVAL"] = 15
    register_periodic_jobs(scheduler)
    assert periodic(scheduler)["app.messaging.jobs.periodic_reconcile"] == 15
    assert len(list(scheduler.get_jobs())) == len(PERIODIC_JOBS)


def test_periodic_jobs_lost_from_redis_are_registered_again_due_at_once(app, clock, redis_conn):
    scheduler = get_scheduler()
    register_periodic_jobs(scheduler)
    assert restore_periodic_jobs(scheduler) == []  # nothing lost: nothing touched
    redis_conn.flushdb()
    assert restore_periodic_jobs(scheduler) == PERIODIC_JOBS
    restored = list(scheduler.get_jobs(with_times=True))
    assert sorted(job.id for job, _ in restored) == sorted(job.job_id() for job in PERIODIC_JOBS)
    assert all(at.replace(tzinfo=UTC) <= clock.now() for _, at in restored)
    redis_conn.delete(restored[0][0].key)  # its hash alone expired: rq-scheduler would drop it
    assert [job.job_id() for job in restore_periodic_jobs(scheduler)] == [restored[0][0].id]


@pytest.mark.real_only
def test_two_reconcilers_and_a_worker_at_once_send_each_message_once(app, client, redis_conn, spawn_worker, send_log):
    ids = make_customers(200)
    campaign = make_campaign()
    campaign_id = campaign.id
    send_to(client, campaign_id, ids)
    redis_conn.flushdb()
    app.config["STALE_AFTER"] = 0
    worker = spawn_worker(burst=False)
    reports = []

    def run():
        with app.app_context():
            reports.append(reconcile())
            db.session.remove()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: stats(client, campaign_id)["status"] == "sent", timeout=60)
    kill_group(worker)
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 200 and set(sends.values()) == {1}
    assert sum(r.requeued for r in reports) >= 200


@pytest.mark.real_only
def test_worker_killed_mid_campaign_new_worker_completes_it(app, client, clock, spawn_worker, send_log):
    ids = make_customers(300)
    campaign = make_campaign()
    campaign_id = campaign.id
    send_to(client, campaign_id, ids)
    # One send at a time, so that at most one is in flight at the kill (tests/test_concurrency.py: several).
    victim = spawn_worker(burst=False, MOCK_SENDER_LATENCY=0.01, WORKER_CONCURRENCY=1)
    wait_for(lambda: len(read_send_log(send_log)) >= 50, timeout=30, interval=0.05)
    kill_group(victim, signal.SIGKILL)
    sent_before = stats(client, campaign_id)["stats"]["sent"]
    assert 0 < sent_before < 300

    # The test does not wait out the claim's lease (its clock moves past it), nor five minutes for a job the
    # killed worker took off the queue and never claimed.
    app.config["STALE_AFTER"] = 0
    clock.current = datetime.now(UTC) + timedelta(seconds=app.config["JOB_TIMEOUT"] + LEASE_MARGIN + 1)
    first = reconcile()
    assert first.in_doubt <= 1  # the one send in flight at the kill
    # A new worker, left running: an attempt that fails on a loaded machine (a statement past its time limit)
    # waits out its retry delay in RQ's scheduled registry, which a burst worker would not wait for.
    successor = spawn_worker(burst=False)
    try:
        wait_for(lambda: stats(client, campaign_id)["status"] == "sent", timeout=150, interval=0.5)
    except AssertionError:
        raise AssertionError((first, stats(client, campaign_id)["stats"])) from None
    finally:
        kill_group(successor)
    detail = stats(client, campaign_id)
    assert detail["stats"]["sent"] == 300
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 300
    twice = [m for m, n in sends.items() if n > 1]
    assert len(twice) <= 1  # only the message in flight at the kill may reach the sender again
    keys = {a["idempotency_key"] for a in read_send_log(send_log) if a["message_id"] in twice}
    assert len(keys) == len(twice)  # and it carries the same idempotency key both times


@pytest.mark.real_only
def test_dispatch_happens_within_seconds_of_scheduled_at_never_before(app, client, spawn_worker, spawn_scheduler):
    ids = make_customers(3)
    at = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    body = {"name": "Real time", "channel": "sms", "base_template": "Hi {first_name}", "scheduled_at": at.isoformat()}
    campaign = client.post("/campaigns", json=body).get_json()
    send_to(client, campaign["id"], ids)
    spawn_scheduler(SCHEDULER_INTERVAL=1)
    spawn_worker(burst=False)
    wait_for(lambda: stats(client, campaign["id"])["status"] == "sent", timeout=30)
    messages = client.get(f"/campaigns/{campaign['id']}/messages").get_json()["data"]
    sent_at = [datetime.fromisoformat(m["updated_at"]) for m in messages]
    assert min(sent_at) >= at
    assert max(sent_at) <= at + timedelta(seconds=4)


@pytest.mark.real_only
def test_two_scheduler_processes_dispatch_each_campaign_once(app, client, spawn_worker, spawn_scheduler, send_log):
    ids = make_customers(4)
    at = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    body = {"channel": "sms", "base_template": "Hi {first_name}", "scheduled_at": at.isoformat()}
    campaigns = [client.post("/campaigns", json={**body, "name": f"c{i}"}).get_json()["id"] for i in range(5)]
    for campaign_id in campaigns:
        send_to(client, campaign_id, ids)
    spawn_scheduler(SCHEDULER_INTERVAL=1)
    spawn_scheduler(SCHEDULER_INTERVAL=1)
    spawn_worker(burst=False)
    spawn_worker(burst=False)
    wait_for(lambda: all(stats(client, c)["status"] == "sent" for c in campaigns), timeout=30)
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 20 and set(sends.values()) == {1}


@pytest.mark.parametrize("dequeue", ["blpop", "lmove"])
def test_job_lost_between_dequeue_and_start_is_requeued(
    app, client, clock, redis_conn, work, send_log, dequeue, send_queue
):
    """A worker that dies right after taking a job off the queue leaves it saying `queued` in no queue:
    a worker on several queues (ours) pops it with BLPOP, one on a single queue moves it into RQ's
    intermediate list. The reconciler must not count it as waiting, nor the jobs behind it as lost."""
    ids = make_customers(3)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    queue = send_queue
    # What the worker's dequeue does, and then it dies.
    if dequeue == "blpop":
        redis_conn.blpop([queue.key], timeout=1)
    else:
        redis_conn.lmove(queue.key, f"{queue.key}:intermediate", "LEFT", "RIGHT")
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 1
    work()
    assert stats(client, campaign.id)["status"] == "sent"
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 3 and set(sends.values()) == {1}


def test_last_job_lost_from_an_emptied_queue_is_requeued(app, client, clock, redis_conn, work, send_log, send_queue):
    ids = make_customers(1)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    redis_conn.lpop(send_queue.key)
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 1
    work()
    assert stats(client, campaign.id)["status"] == "sent"
