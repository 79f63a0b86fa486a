"""The send path holds nothing across the network: a send claims its message in one short transaction
(`sending`, with a lease), calls the provider with no transaction and no pooled connection, and records
what came of it in a second one. Cancel and pause commit first and wait for no send; resume sends everything
at once; a claim whose worker died runs out and its message goes again, counted as in doubt."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from rq.job import Job
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app import metrics
from app.extensions import db
from app.messaging import receipts
from app.messaging.reconcile import reconcile
from app.messaging.send.job import LEASE_MARGIN
from app.models import MessageStatus, OutboundMessage
from config import database_url
from tests.conftest import TEST_DATABASE_URL, kill_group, read_send_log, wait_for
from tests.factories import bulk_customers, make_campaign
from tests.helpers import stats
from tests.pgbouncer import PgBouncer

pytestmark = pytest.mark.real_only


def send_all(client, campaign_id: int, ids: list[int]) -> None:
    for start in range(0, len(ids), 10_000):
        response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids[start : start + 10_000]})
        assert response.status_code == 202, response.get_json()


def detail(client, campaign_id: int) -> dict:
    db.session.rollback()
    return client.get(f"/campaigns/{campaign_id}").get_json()


def rows(campaign_id: int) -> list[OutboundMessage]:
    db.session.rollback()
    return db.session.scalars(
        select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id).order_by(OutboundMessage.id)
    ).all()


def sent_count(send_log) -> int:
    return sum(1 for line in read_send_log(send_log) if line["ok"])


def test_a_cancel_answers_without_waiting_for_sends_in_flight_and_no_send_starts_after_it(
    app, client, spawn_worker, send_log
):
    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(2000))
    # 24 sends in flight at a time, each taking 3 s at the provider: a cancel that waited for them would
    # answer no sooner than that.
    spawn_worker(burst=False, MOCK_SENDER_LATENCY=3, WORKER_CONCURRENCY=24)
    # The first 24 went; the next 24 are at the provider for the next 3 s.
    wait_for(lambda: sent_count(send_log) >= 24 and detail(client, campaign.id)["stats"]["sent"] >= 24, 60)
    time.sleep(0.5)

    # Receipts for messages already sent keep coming while the cancel runs: none may wait on it.
    # Their provider ids as plain values: the poster's thread must not load anything through this thread's session.
    delivered = [m.provider_message_id for m in rows(campaign.id) if m.status == MessageStatus.SENT]
    timings: list[float] = []
    stop = threading.Event()

    def post_receipts() -> None:
        with app.app_context():
            for provider_message_id in delivered:
                if stop.is_set():
                    break
                started = time.monotonic()
                receipts.record([receipts.Receipt("mock", provider_message_id, MessageStatus.DELIVERED)])
                timings.append(time.monotonic() - started)
                time.sleep(0.01)
            db.session.remove()

    poster = threading.Thread(target=post_receipts)
    poster.start()
    asked = time.time()
    answer = client.post(f"/campaigns/{campaign.id}/cancel")
    answered = time.time()
    stop.set()
    poster.join()

    assert answer.status_code == 200
    body = answer.get_json()
    assert body["status"] == "canceled"
    assert answered - asked < 1.5, "the cancel waited for the sends in flight"
    assert body["stats"].get("sending", 0) > 0  # answered while they were still at the provider
    assert body["stats"]["pending"] == body["stats"]["queued"] == 0
    assert timings and max(timings) < 0.5

    wait_for(lambda: detail(client, campaign.id)["stats"]["sending"] == 0, timeout=60)
    # No provider request started after the cancel answered; the ones in flight were recorded as sent.
    late = [line for line in read_send_log(send_log) if line["started"] > answered]
    assert late == []
    final = detail(client, campaign.id)["stats"]
    assert final["sent"] + final["delivered"] == sent_count(send_log)
    assert final["sent"] + final["delivered"] + final["canceled"] == 2000
    assert final["delivered"] == len(timings)


def test_resume_while_held_jobs_still_run_sends_everything_without_the_reconciler(app, client, spawn_worker, send_log):
    campaign = make_campaign()
    ids = bulk_customers(800)
    send_all(client, campaign.id, ids)
    # One worker, a 200 ms provider limited to 100 a second; no scheduler, so no reconciler runs.
    worker = spawn_worker(burst=False, MOCK_SENDER_LATENCY=0.2, SMS_RATE_LIMIT="100/second")
    for target in (150, 400):
        wait_for(lambda target=target: sent_count(send_log) >= target, timeout=60, interval=0.05)
        assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
        time.sleep(0.05)  # the held jobs of the window are running and ending right now
        assert client.post(f"/campaigns/{campaign.id}/resume").status_code == 200
    wait_for(lambda: detail(client, campaign.id)["status"] == "sent", timeout=120)
    assert worker.poll() is None
    sends = Counter(line["message_id"] for line in read_send_log(send_log) if line["ok"])
    assert len(sends) == 800 and set(sends.values()) == {1}
    assert detail(client, campaign.id)["stats"] == stats(total=800, sent=800)


def test_a_held_job_ending_after_the_resume_cannot_take_the_resumed_message_with_it(
    app, client, redis_conn, work, send_log
):
    """A job that ran while the campaign was paused ends after the resume: RQ then writes the end of its run
    over its job's hash, and lets the hash expire. The resumed message's job must not be that hash."""
    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(1))
    queue = Queue(app.config["SEND_QUEUE"], connection=redis_conn)
    [held] = queue.job_ids
    assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
    work()  # the job runs while paused, and ends without work
    assert client.post(f"/campaigns/{campaign.id}/resume").status_code == 200
    redis_conn.delete(Job.key_for(held))  # the held run's hash expires (its result TTL), after the resume
    work()
    assert sent_count(send_log) == 1
    assert detail(client, campaign.id)["status"] == "sent"


def test_a_worker_with_64_sends_in_flight_keeps_8_connections_and_no_transaction_open(
    app, client, spawn_worker, send_log
):
    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(640))
    name = "worker-under-test"
    url = make_url(TEST_DATABASE_URL).update_query_dict({"application_name": name})
    spawn_worker(
        burst=True,
        DATABASE_URL=url.render_as_string(hide_password=False),
        WORKER_CONCURRENCY=64,
        PROVIDER_MAX_CONNECTIONS=64,
        DATABASE_POOL_SIZE=64,  # what the worker needed before its budget (WORKER_DATABASE_POOL_SIZE) was its own
        MOCK_SENDER_LATENCY=0.5,
    )
    sampler = create_engine(app.config["SQLALCHEMY_DATABASE_URI"], pool_size=1)
    connections, idle_in_transaction = [], []
    with sampler.connect() as conn:
        conn.execute(text("SET application_name = 'sampler'"))
        while detail(client, campaign.id)["status"] != "sent":
            sample = conn.execute(
                text(
                    "SELECT count(*), coalesce(max(extract(epoch FROM clock_timestamp() - state_change)) "
                    "FILTER (WHERE state = 'idle in transaction'), 0) "
                    "FROM pg_stat_activity WHERE application_name = :name"
                ),
                {"name": name},
            ).one()
            conn.commit()
            connections.append(sample[0])
            idle_in_transaction.append(float(sample[1]))
            time.sleep(0.05)
    sampler.dispose()
    assert sent_count(send_log) == 640
    assert max(connections) <= 8, f"the worker opened {max(connections)} connections"
    # A transaction held across a provider call would stay open 0.5 s or more (the mock's latency). The gaps
    # between a short transaction's statements are milliseconds (under 0.1 s on an idle machine), but 64
    # threads on a loaded 2-core machine can wait past 0.1 s for the interpreter between two of them.
    assert max(idle_in_transaction) < 0.25, f"a transaction stayed open {max(idle_in_transaction):.3f} s"
    assert len(connections) > 20  # sampled all along the run (about 5 s)


def test_a_killed_workers_claims_run_out_and_their_messages_go_again_counted_in_doubt(
    app, client, clock, spawn_worker, send_log, log_lines
):
    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(100))
    victim = spawn_worker(burst=False, MOCK_SENDER_LATENCY=5, WORKER_CONCURRENCY=8)
    wait_for(lambda: detail(client, campaign.id)["stats"]["sending"] == 8, timeout=60, interval=0.05)
    kill_group(victim)  # SIGKILL: the eight claims stay, held by a worker that is gone
    claimed = [m for m in rows(campaign.id) if m.status == MessageStatus.SENDING]
    assert len(claimed) == 8 and len({m.claimed_by for m in claimed}) == 1
    assert all(m.lease_until > datetime.now(UTC) for m in claimed)

    clock.current = datetime.now(UTC)
    assert reconcile().in_doubt == 0  # their leases have not run out yet
    clock.current = max(m.lease_until for m in claimed) + timedelta(seconds=1)
    assert claimed[0].lease_until - datetime.now(UTC) <= timedelta(seconds=app.config["JOB_TIMEOUT"] + LEASE_MARGIN)
    report = reconcile()
    assert report.in_doubt == 8
    in_doubt = [line for line in log_lines() if "the send is in doubt" in line["message"]]
    assert sorted(line["message_id"] for line in in_doubt) == sorted(m.id for m in claimed)
    assert {line["level"] for line in in_doubt} == {"WARNING"}
    assert metrics.flush(app)
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'dispatch_sends_in_doubt_total{reason="lease_expired"} 8.0' in scrape

    drain = spawn_worker(burst=True)
    assert drain.wait(timeout=120) == 0
    final = detail(client, campaign.id)
    assert (final["status"], final["stats"]) == ("sent", stats(total=100, sent=100))


@pytest.fixture
def pgbouncer():
    """A private PgBouncer in transaction mode in front of the test database's server."""
    bouncer = PgBouncer(TEST_DATABASE_URL, pool_size=4)
    bouncer.start()
    yield bouncer
    bouncer.stop()


def test_workers_send_through_pgbouncer_in_transaction_mode(app, app_with, client, spawn_worker, send_log, pgbouncer):
    """Two workers of 24 sends each share 4 server connections: what a deploy past PostgreSQL's connection
    limit runs. PgBouncer 1.18 keeps no prepared statement across transactions and takes no startup option."""
    through = pgbouncer.url(make_url(TEST_DATABASE_URL).database)
    for pooled, answers in ((False, False), (True, True)):
        other = app_with(SQLALCHEMY_DATABASE_URI=database_url(through), DATABASE_PGBOUNCER=pooled)
        with other.app_context():
            try:
                db.session.execute(text("SELECT 1"))
                connected = True
            except OperationalError as exc:
                assert "unsupported startup parameter" in str(exc)  # the statement timeout's startup option
                connected = False
            db.session.remove()
        assert connected is answers

    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(600))
    workers = [
        spawn_worker(DATABASE_URL=through, DATABASE_PGBOUNCER="true", MOCK_SENDER_LATENCY=0.05) for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read().decode()[-2000:]
    sends = Counter(line["message_id"] for line in read_send_log(send_log) if line["ok"])
    assert len(sends) == 600 and set(sends.values()) == {1}
    assert detail(client, campaign.id)["stats"] == stats(total=600, sent=600)


def test_a_killed_worker_repeats_at_most_the_sends_it_had_in_flight(
    app, client, clock, spawn_worker, use_provider, fake_providers
):
    """The true bound of repeats after a crash: the sends in flight (at most WORKER_CONCURRENCY a process),
    each counted as in doubt; not one. Counted at the provider, which sees a request when it arrives."""
    use_provider("twilio")
    fake_providers.latency = 3  # every answer takes 3 s: the kill finds a full set of sends in flight
    settings = ("SMS_PROVIDER", "PUBLIC_BASE_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM")
    env = {name: app.config[name] for name in settings} | {"TWILIO_BASE_URL": fake_providers.base_url}
    campaign = make_campaign()
    send_all(client, campaign.id, bulk_customers(40))
    victim = spawn_worker(burst=False, WORKER_CONCURRENCY=8, **env)
    wait_for(lambda: len(fake_providers.requests("twilio")) >= 8, timeout=60, interval=0.05)
    kill_group(victim)
    in_flight = len(fake_providers.requests("twilio"))
    assert 1 < in_flight <= 8

    clock.current = datetime.now(UTC) + timedelta(seconds=app.config["JOB_TIMEOUT"] + LEASE_MARGIN + 1)
    report = reconcile()
    assert report.in_doubt == in_flight  # each counted
    fake_providers.latency = 0
    drain = spawn_worker(burst=True, **env)
    assert drain.wait(timeout=120) == 0, drain.stderr.read().decode()[-2000:]
    delivered = Counter(request.params["To"] for request in fake_providers.requests("twilio"))
    assert len(delivered) == 40
    repeated = [to for to, count in delivered.items() if count > 1]
    assert len(repeated) == in_flight and max(delivered.values()) == 2
    assert detail(client, campaign.id)["stats"] == stats(total=40, sent=40)
