"""Redis holds a window, not the audience: a sending campaign has at most its window of send jobs in Redis,
whatever its size, so Redis's memory stays flat, campaigns sending at once share the workers (weighted by
their `priority`), and a paused or canceled campaign leaves one window of no-ops behind, not its audience.
Refills are driven by the rows: a flush, a killed worker or web process, or two refills at once leave no
message unsent and none sent twice, and one pass of the reconciler past `STALE_AFTER` is all it takes.

Most tests run real worker processes on real PostgreSQL and Redis; wall-clock bounds are asserted only
where the bound is the requirement, with the slack a loaded 2-core machine needs."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from sqlalchemy import func, insert, select, text

from app.extensions import db
from app.messaging.reconcile import reconcile
from app.models import Customer, OutboundMessage
from tests.conftest import ROOT, read_send_log, wait_for

# The window of a `normal` campaign (SEND_WINDOW's default), and the sends a worker keeps in flight
# (WORKER_CONCURRENCY's default); set by each test for its worker processes.
WINDOW = 500
CONCURRENCY = 24

_phones = itertools.count(1)


def add_customers(count: int, location: str) -> None:
    """`count` customers in `location`, in one statement (tests here need up to 100,000)."""
    first = next(_phones)
    for _ in range(count - 1):
        next(_phones)
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(
            text(
                "INSERT INTO customers (phone, first_name, last_name, location, preferred_product, created_at, "
                "updated_at) SELECT '+2547' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g, :location, "
                "'Product' || (g % 50), now(), now() "
                "FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g"
            ),
            {"location": location, "first": first, "last": first + count - 1},
        )
    else:
        rows = [
            {"phone": f"+2547{n:08d}", "first_name": f"First{n}", "location": location, "preferred_product": "Shoes"}
            for n in range(first, first + count)
        ]
        db.session.execute(insert(Customer), rows)
    db.session.commit()


def create_campaign(client, name: str, **fields) -> int:
    body = {"name": name, "channel": "sms", "base_template": "Hi {first_name}, {preferred_product}", **fields}
    response = client.post("/campaigns", json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def send_to(client, campaign_id: int, location: str) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"audience": {"location": location}})
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def detail(client, campaign_id: int) -> dict:
    db.session.rollback()  # the test's session: forget what it read before the workers wrote
    return client.get(f"/campaigns/{campaign_id}").get_json()


def send_queue(app) -> Queue:
    return Queue(app.config["SEND_QUEUE"], connection=app.extensions["redis"])


def used_memory(redis) -> int:
    return redis.info("memory")["used_memory"]


def sends_of(send_log, campaign_id: int) -> list[dict]:
    return [line for line in read_send_log(send_log) if line["campaign_id"] == campaign_id]


def assert_each_sent_once(send_log, campaign_id: int, total: int) -> None:
    sends = Counter(line["message_id"] for line in sends_of(send_log, campaign_id) if line["ok"])
    assert len(sends) == total
    assert [m for m, n in sends.items() if n > 1] == []


def count_of(campaign_id: int, *statuses: str) -> int:
    """The campaign's messages in `statuses`, counted in the database."""
    db.session.rollback()
    return db.session.scalar(
        select(func.count()).where(OutboundMessage.campaign_id == campaign_id, OutboundMessage.status.in_(statuses))
    )


def in_window(campaign_id: int) -> int:
    """The campaign's messages in its window: queued (their job in Redis) or sending (claimed)."""
    return count_of(campaign_id, "queued", "sending")


def wait_until_settled(app, client, campaign_id: int, timeout: float = 120) -> dict:
    """Wait until nothing of the campaign is in flight or in the queue and its stats stay still for a
    second (what a worker can do alone is done); returns its detail."""
    last: list[dict] = []

    def settled() -> bool:
        now = detail(client, campaign_id)
        idle = count_of(campaign_id, "sending") == 0 and send_queue(app).count == 0
        if idle and last and last[-1] == now["stats"]:
            return True
        last.append(now["stats"] if idle else {})
        return False

    wait_for(settled, timeout=timeout, interval=1)
    return detail(client, campaign_id)


def past_stale_after(app, clock) -> None:
    """Move the service's clock (this process's, where the reconciler runs) past `STALE_AFTER`. Only with
    nothing `sending`: it also moves past the leases of sends in flight."""
    clock.current = datetime.now(UTC) + timedelta(seconds=app.config["STALE_AFTER"] + 1)


# --- memory: Redis holds a window ----------------------------------------------------------------------


@pytest.mark.real_only
def test_redis_memory_stays_under_32_mb_and_flat_from_10k_to_100k_recipients(app, client, private_redis, work):
    """Measured on a redis-server of the test's own, so that nobody else's keys move `used_memory`. A
    control-queue worker runs (what a send hands to it runs), and no send worker: nothing drains."""
    redis = private_redis.client()
    app.extensions["redis"] = redis
    app.config["SEND_WINDOW"] = WINDOW
    above_idle, in_redis, waiting = {}, {}, {}
    for count in (10_000, 100_000):
        location = f"town-{count}"
        add_customers(count, location)
        campaign_id = create_campaign(client, location)
        private_redis.stop()  # each size on a server just started, as empty as the first one was
        private_redis.start()
        idle = used_memory(redis)
        answer = send_to(client, campaign_id, location)
        # The request adds one batch of recipients; the control queue's job adds the rest.
        assert answer["messages_queued"] == min(count, app.config["RECIPIENT_BATCH"])
        assert answer["adding_recipients"] is (count > app.config["RECIPIENT_BATCH"])
        work([app.config["CONTROL_QUEUE"]])
        above_idle[count] = used_memory(redis) - idle
        in_redis[count] = send_queue(app).count
        waiting[count] = detail(client, campaign_id)["stats"]["pending"]
    assert above_idle[100_000] <= 32 * 2**20, f"{above_idle[100_000] / 2**20:.1f} MB above idle"
    # Flat: ten times the recipients, the same memory within 10%.
    assert max(above_idle.values()) <= 1.1 * min(above_idle.values()), above_idle
    # One window in Redis; the rest waits in PostgreSQL.
    assert in_redis == {10_000: WINDOW, 100_000: WINDOW}
    assert waiting == {10_000: 10_000 - WINDOW, 100_000: 100_000 - WINDOW}


def test_a_send_beside_a_big_campaign_sending_answers_at_once_and_queues_one_window(app, backend, client, work):
    big = 100_000 if backend == "real" else 5_000
    app.config["SEND_WINDOW"] = WINDOW
    add_customers(big, "everywhere")
    add_customers(10, "village")
    big_id = create_campaign(client, "newsletter")
    send_to(client, big_id, "everywhere")
    work([app.config["CONTROL_QUEUE"]])
    assert send_queue(app).count == WINDOW

    flash_id = create_campaign(client, "flash sale")
    started = time.perf_counter()
    answer = send_to(client, flash_id, "village")
    answered = time.perf_counter() - started
    work([app.config["CONTROL_QUEUE"]])
    assert answer["messages_queued"] == 10
    # Nothing of the big audience was walked into Redis: its window, and the new campaign's ten.
    assert send_queue(app).count == WINDOW + 10
    # The bound is the requirement; such a request takes 20-100 ms here, on a busy 2-core machine too.
    assert answered < 1.0


def test_a_campaign_s_detail_says_how_many_jobs_of_other_campaigns_its_messages_wait_beside(app, client, work):
    app.config["SEND_WINDOW"] = 5
    add_customers(20, "everywhere")
    add_customers(3, "village")
    big_id, flash_id = create_campaign(client, "newsletter"), create_campaign(client, "flash sale")
    assert detail(client, flash_id)["queued_beside_others"] is None  # a draft queues nothing

    send_to(client, big_id, "everywhere")
    work([app.config["CONTROL_QUEUE"]])
    assert detail(client, big_id)["queued_beside_others"] == 0  # alone in the queue

    send_to(client, flash_id, "village")
    work([app.config["CONTROL_QUEUE"]])
    assert send_queue(app).count == 5 + 3
    assert detail(client, flash_id)["queued_beside_others"] == 5  # the big one's window came first
    assert detail(client, big_id)["queued_beside_others"] == 3

    work()
    assert detail(client, flash_id)["status"] == detail(client, big_id)["status"] == "sent"
    assert detail(client, flash_id)["queued_beside_others"] is None


# --- fair share ------------------------------------------------------------------------------------------


@pytest.mark.real_only
def test_a_small_campaign_sent_beside_a_big_one_is_sent_within_10_s_while_the_big_one_still_sends(
    app, client, spawn_worker
):
    add_customers(20_000, "everywhere")
    add_customers(10, "village")
    big_id = create_campaign(client, "newsletter")
    send_to(client, big_id, "everywhere")
    spawn_worker(burst=False, SEND_WINDOW=WINDOW)
    wait_for(lambda: detail(client, big_id)["stats"]["sent"] >= 300, timeout=60)  # under way

    small_id = create_campaign(client, "flash sale")
    requested = time.monotonic()
    send_to(client, small_id, "village")
    wait_for(lambda: detail(client, small_id)["status"] == "sent", timeout=60, interval=0.1)
    took = time.monotonic() - requested
    big = detail(client, big_id)
    # The bound. Ahead of the small campaign is one window of the big one (500 sends: 2-5 s here).
    assert took <= 10, f"the small campaign took {took:.1f} s"
    assert big["status"] == "sending" and big["stats"]["pending"] > 10_000


@pytest.mark.real_only
def test_two_equal_campaigns_started_together_finish_within_10_percent_of_each_other(
    app, client, spawn_worker, send_log
):
    # The campaign ahead in the line leads by at most one window, which the other drains at the end: a
    # window of 50 keeps that a small part (2.5%) of a run short enough for a test (2 x 1,000 sends).
    app.config["SEND_WINDOW"] = 50
    for location in ("north", "south"):
        add_customers(1000, location)
    campaigns = [create_campaign(client, location) for location in ("north", "south")]
    for campaign_id, location in zip(campaigns, ("north", "south"), strict=True):
        send_to(client, campaign_id, location)
    spawn_worker(burst=False, SEND_WINDOW=50)
    wait_for(lambda: all(detail(client, c)["status"] == "sent" for c in campaigns), timeout=180, interval=0.5)

    # From the first send recorded to each campaign's end, both as the workers' clock says.
    db.session.rollback()
    began = db.session.scalar(select(func.min(OutboundMessage.updated_at))).timestamp()
    took = [datetime.fromisoformat(detail(client, c)["updated_at"]).timestamp() - began for c in campaigns]
    assert abs(took[0] - took[1]) <= 0.1 * max(took), f"finished {took[0]:.1f} s and {took[1]:.1f} s in"
    for campaign_id in campaigns:
        assert_each_sent_once(send_log, campaign_id, 1000)


@pytest.mark.real_only
def test_a_high_priority_campaign_gets_a_larger_share_than_a_normal_one_sending_beside_it(
    app, client, spawn_worker, send_log
):
    app.config["SEND_WINDOW"] = 100  # high: 200; one turn of the line is 300 sends
    for location in ("normal", "high"):
        add_customers(2000, location)
    # The normal one is sent first: its window is ahead in the line.
    normal_id = create_campaign(client, "newsletter", priority="normal")
    high_id = create_campaign(client, "flash sale", priority="high")
    send_to(client, normal_id, "normal")
    send_to(client, high_id, "high")
    assert (detail(client, normal_id)["priority"], detail(client, high_id)["priority"]) == ("normal", "high")
    spawn_worker(burst=False, SEND_WINDOW=100)
    wait_for(lambda: len(read_send_log(send_log)) >= 1200, timeout=120, interval=0.5)

    # Shares over three turns of the line, after the first: both still have plenty to send.
    lines = sorted(read_send_log(send_log), key=lambda line: line["started"])[300:1200]
    shares = Counter(line["campaign_id"] for line in lines)
    assert shares[high_id] >= 1.5 * shares[normal_id], shares  # twice by the windows' weights
    assert shares[normal_id] > 0.2 * len(lines), shares  # and the normal one still advances


# --- pause and cancel ------------------------------------------------------------------------------------


@pytest.mark.real_only
def test_a_pause_leaves_at_most_one_window_whose_jobs_end_without_sending(app, client, spawn_worker, send_log):
    app.config["SEND_WINDOW"] = WINDOW
    add_customers(1500, "everywhere")  # three windows: one in Redis, the rest waiting in the database
    campaign_id = create_campaign(client, "newsletter")
    send_to(client, campaign_id, "everywhere")
    spawn_worker(burst=False, SEND_WINDOW=WINDOW, WORKER_CONCURRENCY=CONCURRENCY)
    wait_for(lambda: detail(client, campaign_id)["stats"]["sent"] >= 300, timeout=60, interval=0.1)

    assert client.post(f"/campaigns/{campaign_id}/pause").status_code == 200
    paused_at = time.time()
    assert send_queue(app).count <= WINDOW
    # The window's jobs run and end at their claim, their messages back in line.
    wait_for(lambda: send_queue(app).count == 0 and in_window(campaign_id) == 0, timeout=60)
    paused = detail(client, campaign_id)
    assert paused["status"] == "paused"
    assert paused["stats"]["pending"] == 1500 - paused["stats"]["sent"]
    late = [line for line in sends_of(send_log, campaign_id) if line["started"] > paused_at]
    assert len(late) <= CONCURRENCY  # at most the sends claimed before the pause, one per thread

    assert client.post(f"/campaigns/{campaign_id}/resume").status_code == 200
    wait_for(lambda: detail(client, campaign_id)["status"] == "sent", timeout=120, interval=0.5)
    assert_each_sent_once(send_log, campaign_id, 1500)


@pytest.mark.real_only
def test_after_a_big_campaign_is_canceled_the_next_campaign_sends_within_seconds(app, client, spawn_worker, send_log):
    app.config["SEND_WINDOW"] = WINDOW
    add_customers(20_000, "everywhere")
    add_customers(10, "village")
    big_id = create_campaign(client, "newsletter")
    send_to(client, big_id, "everywhere")
    spawn_worker(burst=False, SEND_WINDOW=WINDOW, WORKER_CONCURRENCY=CONCURRENCY)
    wait_for(lambda: detail(client, big_id)["stats"]["sent"] >= 300, timeout=60, interval=0.1)

    assert client.post(f"/campaigns/{big_id}/cancel").status_code == 200
    canceled_at = time.time()
    assert send_queue(app).count <= WINDOW  # its leftover jobs: one window, not 19,700

    next_id = create_campaign(client, "flash sale")
    requested = time.time()
    send_to(client, next_id, "village")
    wait_for(lambda: detail(client, next_id)["status"] == "sent", timeout=60, interval=0.1)
    first = min(line["started"] for line in sends_of(send_log, next_id))
    # Issue 20: 4,062 leftover jobs delayed the next campaign by 170 s. One window of no-ops takes about a
    # second here; 5 s leaves room for a loaded machine.
    assert first - requested <= 5, f"the next campaign's first send started {first - requested:.1f} s after"

    wait_for(lambda: send_queue(app).count == 0 and in_window(big_id) == 0, timeout=60)
    big = detail(client, big_id)
    assert big["stats"]["sent"] + big["stats"]["canceled"] == 20_000
    big_sends = sends_of(send_log, big_id)
    assert len(big_sends) == big["stats"]["sent"]
    assert len([line for line in big_sends if line["started"] > canceled_at]) <= CONCURRENCY


# --- faults ----------------------------------------------------------------------------------------------


@pytest.mark.real_only
def test_a_redis_flush_mid_campaign_is_healed_by_one_reconciler_pass_and_each_message_goes_once(
    app, client, clock, private_redis, spawn_worker, send_log
):
    app.config["SEND_WINDOW"] = 100
    app.extensions["redis"] = private_redis.client()
    add_customers(1000, "everywhere")
    campaign_id = create_campaign(client, "newsletter")
    send_to(client, campaign_id, "everywhere")
    spawn_worker(burst=False, SEND_WINDOW=100, REDIS_URL=private_redis.url)
    wait_for(lambda: detail(client, campaign_id)["stats"]["sent"] >= 300, timeout=60, interval=0.1)

    private_redis.client().flushall()
    # The window's jobs are gone. Its messages still say `queued`: until the reconciler finds them, they hold
    # their places in the window, and the rest of it carries on.
    stuck = wait_until_settled(app, client, campaign_id)
    lost = count_of(campaign_id, "queued")
    assert stuck["status"] == "sending" and 0 < lost <= 100

    past_stale_after(app, clock)
    report = reconcile()
    assert report.requeued == lost
    assert send_queue(app).count <= 100  # what it puts back is a window, not the rest of the audience
    wait_for(lambda: detail(client, campaign_id)["status"] == "sent", timeout=120, interval=0.5)
    assert_each_sent_once(send_log, campaign_id, 1000)


# A worker process that dies (SIGKILL, with the processes it forked) the first time it enqueues anything:
# in a send job's refill, after the refill's commit and before its jobs reach Redis.
WORKER_DIES_IN_ITS_FIRST_REFILL = """
import os, runpy, signal, sys
from rq import Queue

Queue.enqueue_many = lambda *args, **kwargs: os.killpg(0, signal.SIGKILL)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.real_only
def test_a_worker_killed_mid_refill_leaves_nothing_unsent_and_nothing_sent_twice(
    app, client, clock, spawn, spawn_worker, send_log
):
    app.config["SEND_WINDOW"] = 100  # a send job refills once the window is 10 below its size
    add_customers(500, "everywhere")
    campaign_id = create_campaign(client, "newsletter")
    send_to(client, campaign_id, "everywhere")
    # One send at a time: nothing is at the provider when it dies, so no send is in doubt.
    victim = spawn(
        ["-c", WORKER_DIES_IN_ITS_FIRST_REFILL, str(ROOT / "worker.py")], SEND_WINDOW=100, WORKER_CONCURRENCY=1
    )
    assert victim.wait(timeout=60) == -signal.SIGKILL, victim.stderr.read().decode()[-3000:]
    # Ten sent; the refill after the tenth committed ten more messages `queued`, whose jobs never came.
    assert (count_of(campaign_id, "sent"), count_of(campaign_id, "queued")) == (10, 100)

    spawn_worker(burst=False, SEND_WINDOW=100)
    stuck = wait_until_settled(app, client, campaign_id)
    assert stuck["status"] == "sending"
    assert (count_of(campaign_id, "queued"), count_of(campaign_id, "pending")) == (10, 0)

    past_stale_after(app, clock)
    report = reconcile()
    assert (report.requeued, report.refilled, report.in_doubt) == (10, 10, 0)
    wait_for(lambda: detail(client, campaign_id)["status"] == "sent", timeout=60, interval=0.5)
    assert_each_sent_once(send_log, campaign_id, 500)


# A web process killed (SIGKILL) during a send, after the window's messages were committed `queued` and before
# their jobs reached Redis.
SEND_DIES_BEFORE_ITS_ENQUEUE = """
import os, signal, sys
from rq import Queue
from app import create_app
from app.campaigns import service

Queue.enqueue_many = lambda *args, **kwargs: os.killpg(0, signal.SIGKILL)
with create_app().app_context():
    service.send_campaign(int(sys.argv[1]), audience={"all": True})
"""


@pytest.mark.real_only
def test_a_send_killed_between_its_commit_and_its_enqueue_is_healed_by_one_reconciler_pass(
    app, client, clock, spawn, spawn_worker, send_log
):
    app.config["SEND_WINDOW"] = 100
    add_customers(500, "everywhere")
    campaign_id = create_campaign(client, "newsletter")
    web = spawn(["-c", SEND_DIES_BEFORE_ITS_ENQUEUE, str(campaign_id)], SEND_WINDOW=100)
    assert web.wait(timeout=60) == -signal.SIGKILL, web.stderr.read().decode()[-3000:]
    assert send_queue(app).count == 0
    assert detail(client, campaign_id)["status"] == "sending"
    assert (count_of(campaign_id, "queued"), count_of(campaign_id, "pending")) == (100, 400)

    spawn_worker(burst=False, SEND_WINDOW=100)
    clock.current = datetime.now(UTC)
    assert (reconcile().requeued, send_queue(app).count) == (0, 0)  # not stale yet: it might still be enqueueing
    past_stale_after(app, clock)
    report = reconcile()
    assert (report.requeued, report.refilled) == (100, 100)
    wait_for(lambda: detail(client, campaign_id)["status"] == "sent", timeout=60, interval=0.5)
    assert_each_sent_once(send_log, campaign_id, 500)


@pytest.mark.real_only
def test_refills_racing_for_the_same_room_fill_it_once(app, client, work, send_log):
    from app.messaging.send import window  # the one test here that runs refills itself

    app.config["SEND_WINDOW"] = 100
    add_customers(1000, "everywhere")
    campaign_id = create_campaign(client, "newsletter")
    send_to(client, campaign_id, "everywhere")
    app.config["SEND_WINDOW"] = 600  # 500 places free: eight refills race for them
    start = threading.Barrier(8)
    queued: list[int] = []

    def refill() -> None:
        with app.app_context():
            start.wait()
            queued.append(window.refill(campaign_id).queued)
            db.session.remove()

    threads = [threading.Thread(target=refill) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(queued) == 500
    job_ids = send_queue(app).job_ids
    assert len(job_ids) == len(set(job_ids)) == 600
    assert in_window(campaign_id) == 600

    work()
    assert detail(client, campaign_id)["status"] == "sent"
    assert_each_sent_once(send_log, campaign_id, 1000)


@pytest.mark.real_only
def test_two_workers_refilling_one_window_at_once_keep_it_and_send_each_message_once(
    app, client, spawn_worker, send_log
):
    # 48 sends in flight for a window of 30 refilled every 3 sends: the workers' refills race all along.
    app.config["SEND_WINDOW"] = 30
    add_customers(1000, "everywhere")
    campaign_id = create_campaign(client, "newsletter")
    send_to(client, campaign_id, "everywhere")
    for _ in range(2):
        spawn_worker(burst=False, SEND_WINDOW=30, WORKER_CONCURRENCY=CONCURRENCY)
    samples = []
    while detail(client, campaign_id)["status"] != "sent":
        samples.append((in_window(campaign_id), send_queue(app).count))
        assert len(samples) < 3000, "the campaign did not finish within about five minutes"
        time.sleep(0.05)
    assert max(in_db for in_db, _ in samples) <= 30
    assert max(in_redis for _, in_redis in samples) <= 30
    assert len(samples) > 20  # sampled all along the run
    assert_each_sent_once(send_log, campaign_id, 1000)
