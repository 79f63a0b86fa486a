"""The send job, run by real RQ workers: rendering, retries, idempotency and campaign completion."""

import contextlib
import threading
import time
from pathlib import Path

import pytest
from flask import current_app
from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.registry import ScheduledJobRegistry
from rq.suspension import resume, suspend
from sqlalchemy import select, text

from app.extensions import db
from app.messaging.app_worker import build_worker, live_worker_count
from app.messaging.send import throttle
from app.messaging.send.window import SEND_JOB, message_job_id
from app.models import OutboundMessage
from tests.conftest import kill_group, read_send_log, wait_for
from tests.factories import make_campaign, make_customer, make_customers
from tests.helpers import claim, stats


def start(client, campaign_id, ids):
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def messages(client, campaign_id, **query):
    return client.get(f"/campaigns/{campaign_id}/messages", query_string={"page_size": 100, **query}).get_json()["data"]


def test_worker_sends_renders_and_completes_campaign(client, work, send_log):
    amina = make_customer(first_name="Amina", preferred_product="Sneakers", phone="+254712345678")
    blank = make_customer(first_name=None, preferred_product="")
    campaign = make_campaign(base_template="Hi {first_name}, check out {preferred_product}")
    start(client, campaign.id, [amina.id, blank.id])
    work()
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "sent"
    assert detail["stats"] == stats(total=2, sent=2)
    bodies = {m["customer_id"]: m["rendered_content"] for m in messages(client, campaign.id)}
    assert bodies == {amina.id: "Hi Amina, check out Sneakers", blank.id: "Hi [unknown], check out [unknown]"}
    attempts = read_send_log(send_log)
    assert len(attempts) == 2
    first = next(a for a in attempts if a["phone"] == "+254712345678")
    assert first["body"] == "Hi Amina, check out Sneakers" and first["ok"] is True
    assert first["campaign_id"] == campaign.id
    assert first["idempotency_key"] == f"outbound-message-{first['message_id']}"


def test_two_failures_then_success_leave_retry_count_two(client, app, work, send_log):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 2
    ids = make_customers(2)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    work()
    rows = messages(client, campaign.id)
    assert [(m["status"], m["retry_count"]) for m in rows] == [("sent", 2), ("sent", 2)]
    assert all("attempt 2" in m["last_error"] for m in rows)  # the last failure is kept for the record
    assert [a["ok"] for a in read_send_log(send_log) if a["message_id"] == rows[0]["id"]] == [False, False, True]
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"


def test_exhausted_retries_fail_the_message_after_four_attempts(client, app, work, send_log):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 99
    ids = make_customers(1)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    work()
    [row] = messages(client, campaign.id)
    assert row["status"] == "failed"
    assert row["retry_count"] == 3
    assert row["last_error"].startswith("mock failure")
    assert len(read_send_log(send_log)) == 4
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "failed"
    assert detail["stats"]["failed"] == 1
    assert detail["status_reason"] == "no message could be sent"


def test_campaign_with_some_failures_is_sent(client, app, work, monkeypatch):
    from app.messaging.providers import SendResult
    from app.messaging.providers.mock import MockProvider as MockSender
    from app.models import ErrorClass

    customers = [make_customer() for _ in range(3)]
    ids = [c.id for c in customers]
    doomed = customers[1].phone
    original = MockSender.send

    def send(self, message):
        if message.phone == doomed:
            return SendResult.refused(ErrorClass.TRANSIENT, "number unreachable", "unreachable")
        return original(self, message)

    monkeypatch.setattr(MockSender, "send", send)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    work()
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "sent"
    assert detail["stats"] == stats(total=3, sent=2, failed=1)
    assert messages(client, campaign.id, status="failed")[0]["last_error"] == "number unreachable"


def test_sender_exception_is_a_failed_attempt_and_the_worker_goes_on(client, app, work, monkeypatch):
    from app.messaging.providers.mock import MockProvider as MockSender

    calls = {"n": 0}
    original = MockSender.send

    def flaky(self, message):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("provider timed out")
        return original(self, message)

    monkeypatch.setattr(MockSender, "send", flaky)
    ids = make_customers(3)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    work()
    rows = messages(client, campaign.id)
    assert all(m["status"] == "sent" for m in rows)
    assert sorted(m["retry_count"] for m in rows) == [0, 0, 1]
    assert "provider timed out" in next(m for m in rows if m["retry_count"] == 1)["last_error"]


def test_job_that_runs_twice_sends_once(client, app, work, redis_conn, send_log):
    ids = make_customers(1)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    message_id = messages(client, campaign.id)[0]["id"]
    # A duplicate of the same job, as a re-enqueue after a lost acknowledgement would make.
    Queue(app.config["SEND_QUEUE"], connection=redis_conn).enqueue(SEND_JOB, message_id, 1, job_id=f"dup-{message_id}")
    work()
    assert len(read_send_log(send_log)) == 1
    assert messages(client, campaign.id)[0]["status"] == "sent"


def test_retry_waits_out_the_configured_interval(client, app, work, redis_conn, send_log):
    app.config["RETRY_INTERVALS"] = [30, 60, 90]
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 1
    ids = make_customers(1)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    work()
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"]) == ("queued", 1)  # in its window, its job waiting to run again
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    assert registry.get_job_ids() == [message_job_id(row["id"], 1)]
    scheduled_for = registry.get_scheduled_time(message_job_id(row["id"], 1))
    assert 25 <= (scheduled_for.timestamp() - time.time()) <= 31
    assert len(read_send_log(send_log)) == 1


def test_a_message_another_worker_claimed_is_not_sent_by_a_second_one(client, app, work, send_log):
    ids = make_customers(1)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    message = db.session.scalars(select(OutboundMessage)).one()
    held = claim(message, worker="other-host:42")  # another worker took it, and talks to the provider
    assert held is not None
    work()  # the message's own job finds it claimed, and does nothing
    assert read_send_log(send_log) == []
    [row] = messages(client, campaign.id)
    assert (row["status"], row["claimed_by"]) == ("sending", "other-host:42")
    assert row["lease_until"] is not None


@pytest.mark.real_only
def test_concurrent_workers_complete_every_campaign_exactly(client, app, spawn_worker, send_log):
    """Many small campaigns drained by four worker processes at once: the last messages of a campaign
    finish on different workers at the same moment, and every campaign must still end."""
    customer_ids = make_customers(6)
    ok = [make_campaign(name=f"ok{i}").id for i in range(12)]
    for campaign_id in ok:
        start(client, campaign_id, customer_ids)
    workers = [spawn_worker() for _ in range(4)]
    for proc in workers:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    for campaign_id in ok:
        detail = client.get(f"/campaigns/{campaign_id}").get_json()
        assert (detail["status"], detail["stats"]["sent"]) == ("sent", 6), detail
    attempts = read_send_log(send_log)
    assert len(attempts) == 72
    assert len({a["message_id"] for a in attempts}) == 72  # none sent twice


@pytest.mark.real_only
def test_concurrent_workers_fail_a_campaign_whose_every_message_fails(client, app, spawn_worker):
    customer_ids = make_customers(8)
    campaigns = [make_campaign(name=f"doomed{i}").id for i in range(4)]
    for campaign_id in campaigns:
        start(client, campaign_id, customer_ids)
    # Generous database time limits: on a loaded machine a statement past the default 5 s would end an
    # attempt as a crash (a transient failure of its own), which is not what this test is about.
    slow_machine = {"DATABASE_CONNECT_TIMEOUT": 30, "DATABASE_STATEMENT_TIMEOUT": 60}
    workers = [spawn_worker(MOCK_SENDER_FAIL_ATTEMPTS=99, **slow_machine) for _ in range(2)]
    for proc in workers:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    for campaign_id in campaigns:
        detail = client.get(f"/campaigns/{campaign_id}").get_json()
        assert detail["status"] == "failed"
        assert detail["stats"] == stats(total=8, failed=8)
        rows = messages(client, campaign_id)
        other = [(m["retry_count"], m.get("error_code"), m.get("error")) for m in rows if m["retry_count"] != 3]
        assert other == [], "every message fails once its 3 retries are used, and only then"


@pytest.mark.real_only
def test_two_finalizers_at_once_end_the_campaign_once(client, app):
    """The completion step itself, raced on two threads after the last two messages committed."""
    from app.messaging.lifecycle import finish_campaign

    ids = make_customers(2)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    campaign_id = campaign.id
    db.session.execute(text("UPDATE outbound_messages SET status = 'sent'"))
    db.session.commit()
    results, barrier = [], threading.Barrier(2)

    def finish():
        with app.app_context():
            barrier.wait()
            results.append(finish_campaign(campaign_id))
            db.session.remove()

    threads = [threading.Thread(target=finish) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [None, "sent"]


def test_message_whose_customer_is_gone_fails_and_the_campaign_ends(client, app, work, send_log):
    ids = make_customers(2)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    # Deleted behind the API's back (the API refuses while messages exist).
    db.session.execute(text("DELETE FROM customers WHERE id = :id"), {"id": ids[0]})
    db.session.commit()
    work()
    rows = {m["customer_id"]: m for m in messages(client, campaign.id)}
    assert rows[ids[0]]["status"] == "failed"
    assert rows[ids[0]]["last_error"] == "the customer no longer exists"
    assert rows[ids[1]]["status"] == "sent"
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"
    assert len(read_send_log(send_log)) == 1


def test_a_job_that_crashes_does_not_stop_the_worker(client, app, work, monkeypatch, send_log):
    from app.messaging.send import job as jobs

    ids = make_customers(3)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    real_render, calls = jobs.render, {"n": 0}

    def crash_once(template, fields):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the job")  # escapes the job: RQ records it and retries
        return real_render(template, fields)

    monkeypatch.setattr(jobs, "render", crash_once)
    work()
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert (detail["status"], detail["stats"]["sent"]) == ("sent", 3)
    assert len(read_send_log(send_log)) == 3


def test_worker_key_outlives_the_wait_for_the_next_job(app, redis_conn):
    """RQ blocks on an empty queue for `worker_ttl` - 15 s; the worker key must live longer than that
    after any heartbeat, including right after a job whose own heartbeat gave it a shorter TTL."""
    worker = build_worker(app)
    worker.register_birth()
    worker.heartbeat()
    assert redis_conn.ttl(worker.key) == worker.worker_ttl + 60
    with redis_conn.pipeline() as pipe:  # what RQ does as a job starts, with the job's own TTL
        worker.heartbeat(20, pipeline=pipe)
        pipe.execute()
    assert redis_conn.ttl(worker.key) == 20
    worker.heartbeat()  # the one after the job
    assert redis_conn.ttl(worker.key) > worker.dequeue_timeout


def test_heartbeat_that_would_not_extend_the_worker_key_is_skipped(app, redis_conn):
    worker = build_worker(app)
    worker.register_birth()
    worker.heartbeat()
    redis_conn.hset(worker.key, "last_heartbeat", "marker")
    worker.heartbeat()  # within a second of the last one: nothing to extend
    assert redis_conn.hget(worker.key, "last_heartbeat") == b"marker"
    worker._key_expires_at -= 5  # five seconds later
    worker.heartbeat()
    assert redis_conn.hget(worker.key, "last_heartbeat") != b"marker"


def test_suspended_workers_take_no_job(app, client, redis_conn, work, send_log):
    """`rq suspend` still stops the worker, though it looks for it once a second, not before every job."""
    ids = make_customers(2)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    suspend(redis_conn)
    work()
    assert read_send_log(send_log) == []
    resume(redis_conn)
    work()
    assert len(read_send_log(send_log)) == 2


@pytest.mark.real_only
def test_worker_is_listed_with_its_state_while_it_works(app, client, redis_conn, spawn_worker):
    """The worker's bookkeeping is lighter than RQ's, but `rq info` and /health see the same worker."""
    ids = make_customers(5)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    proc = spawn_worker(burst=False)
    try:
        wait_for(lambda: client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent", timeout=120)
        # The job that ended the campaign still recounts its stats (app.messaging.stats.recount) after that.
        wait_for(lambda: [w.get_state() for w in Worker.all(connection=redis_conn)] == ["idle"], timeout=60)
        workers = Worker.all(connection=redis_conn)
        assert len(workers) == 1
        assert workers[0].successful_job_count == 5
        assert redis_conn.ttl(workers[0].key) > build_worker(app).dequeue_timeout  # alive while it waits
    finally:
        kill_group(proc)


def test_message_rendered_over_the_channel_limit_fails_without_reaching_the_provider(client, work, send_log):
    """A template under the limit can render over it (long values): that message fails for good, with
    the reason, and is never handed to the provider; the others go out."""
    long_value = make_customer(preferred_product="x" * 200)
    short_value = make_customer(preferred_product="Shoes")
    template = "{preferred_product}" * 84  # 1,596 characters, under sms's 1,600
    campaign = make_campaign(base_template=template)
    start(client, campaign.id, [long_value.id, short_value.id])
    work()
    rows = {m["customer_id"]: m for m in messages(client, campaign.id)}
    failed = rows[long_value.id]
    assert (failed["status"], failed["retry_count"]) == ("failed", 0)
    assert failed["last_error"] == "the rendered message is 16800 characters, over the sms limit of 1600"
    assert rows[short_value.id]["status"] == "sent"
    assert [a["phone"] for a in read_send_log(send_log)] == [short_value.phone]
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"


def test_the_worker_running_a_failed_attempt_decides_the_retry_delay(client, app, work, redis_conn):
    """RETRY_INTERVALS has one meaning: the worker's own setting, not that of the process that enqueued."""
    app.config["RETRY_INTERVALS"] = [3600]  # what the web process enqueuing the job has...
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 1
    ids = make_customers(1)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    app.config["RETRY_INTERVALS"] = [20, 40, 80]  # ...and what the worker running it has
    work()
    [row] = messages(client, campaign.id)
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    delay = registry.get_scheduled_time(message_job_id(row["id"], 1)).timestamp() - time.time()
    assert 15 <= delay <= 21


def slow_statement(seconds: float) -> None:
    """A job stuck in a database statement (run by the worker below)."""
    db.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


@pytest.mark.real_only
def test_a_job_stopped_by_its_timeout_mid_statement_does_not_stop_the_worker(client, app, redis_conn, send_log):
    """RQ's job timeout interrupts a statement in flight; the worker discards that connection and goes on."""
    queue = Queue(app.config["SEND_QUEUE"], connection=redis_conn)
    queue.enqueue(slow_statement, args=(30,), job_timeout=1)
    ids = make_customers(2)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    build_worker(app).work(burst=True, logging_level="WARNING")
    db.session.rollback()
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert (detail["status"], detail["stats"]["sent"]) == ("sent", 2)


def time_a_throttle_slot(folder: str) -> None:
    """A job: says it runs, waits for the test to stall Redis, then times one call for a throughput slot."""
    marks = Path(folder)
    (marks / "running").touch()
    deadline = time.monotonic() + 30
    while not (marks / "stalled").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    asked = time.monotonic()
    with contextlib.suppress(RedisError):
        throttle.take_slot(current_app, "sms")
    (marks / "took").write_text(str(time.monotonic() - asked))


@pytest.mark.real_only
def test_a_job_s_calls_to_redis_keep_the_app_s_short_socket_timeout(app, private_redis, spawn_worker, tmp_path):
    """RQ raises the socket timeout of its own connection above its wait for a job (55 s); a job's throttle
    slot, on a stalled Redis, gives up after REDIS_SOCKET_TIMEOUT (1 s) like the web's calls."""
    spawn_worker(burst=False, REDIS_URL=private_redis.url, SMS_RATE_LIMIT="100/second", REDIS_SOCKET_TIMEOUT=1)
    redis = private_redis.client()
    wait_for(lambda: live_worker_count(redis) == 1, timeout=30)
    Queue(app.config["SEND_QUEUE"], connection=redis).enqueue(time_a_throttle_slot, str(tmp_path))
    wait_for(lambda: (tmp_path / "running").exists(), timeout=30, interval=0.05)
    private_redis.stall()
    try:
        (tmp_path / "stalled").touch()
        wait_for(lambda: (tmp_path / "took").exists(), timeout=60, interval=0.05)
    finally:
        private_redis.resume()
    # 1 s, and room for a loaded machine; RQ's own connection would wait over 55 s (the stall outlasts it).
    assert float((tmp_path / "took").read_text()) < 15


def test_rq_gets_a_redis_connection_of_its_own(app):
    """The jobs use the app's connection: RQ's longer socket timeout must not reach it."""
    shared = app.extensions["redis"]
    before = dict(shared.connection_pool.connection_kwargs)
    worker = build_worker(app)
    assert worker.connection is not shared
    assert worker.connection.connection_pool.connection_kwargs["socket_timeout"] == worker.connection_timeout
    assert shared.connection_pool.connection_kwargs == before
