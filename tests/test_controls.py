"""Delivery controls: pause, resume and cancel a campaign, and what the send job, the trigger and the
reconciler do while it is paused or canceled. Real RQ workers (in burst mode, or the worker process) run
the send jobs; the mock provider's log says what reached a provider."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta

import httpx
import pytest
from flask import current_app
from rq import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from sqlalchemy import event, select, text

from app.extensions import db
from app.messaging import lifecycle, receipts
from app.messaging.app_worker import build_worker
from app.messaging.jobs import dispatch_scheduled_campaign
from app.messaging.reconcile import reconcile
from app.messaging.send.store import Outcome
from app.messaging.send.window import enqueue_jobs
from app.models import Campaign, CampaignStatus, MessageStatus, OutboundMessage
from tests.conftest import TEST_API_KEY, read_send_log, wait_for
from tests.factories import make_campaign, make_customers
from tests.helpers import claim, record, stats


def send(client, campaign_id: int, count: int) -> list[int]:
    """Send the campaign to `count` new customers; returns their ids."""
    ids = make_customers(count)
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()
    return ids


def control(client, campaign_id: int, action: str, expected: int = 200) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/{action}")
    assert response.status_code == expected, response.get_json()
    return response.get_json()


def detail(client, campaign_id: int) -> dict:
    db.session.rollback()  # the test's session: forget what it read before other threads wrote
    return client.get(f"/campaigns/{campaign_id}").get_json()


def message_rows(campaign_id: int) -> list[OutboundMessage]:
    db.session.rollback()
    return db.session.scalars(
        select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id).order_by(OutboundMessage.id)
    ).all()


def run_jobs(app, max_jobs: int | None = None) -> None:
    """Run queued jobs with a real RQ worker in burst mode: all of them, or the first `max_jobs`."""
    build_worker(app).work(burst=True, max_jobs=max_jobs, logging_level="WARNING")
    db.session.rollback()


def queued(app, redis_conn) -> int:
    """Send jobs waiting in Redis: in the queue, or scheduled (a retry or a postponement)."""
    queue = Queue(app.config["SEND_QUEUE"], connection=redis_conn)
    return queue.count + ScheduledJobRegistry(queue=queue).count


def sent_ids(send_log) -> Counter:
    """How many times each message reached the provider and was taken."""
    return Counter(line["message_id"] for line in read_send_log(send_log) if line["ok"])


def test_pause_stops_sends_and_its_jobs_put_their_messages_back_in_line(app, client, redis_conn, send_log):
    campaign = make_campaign()
    send(client, campaign.id, 6)
    run_jobs(app, max_jobs=2)
    paused = control(client, campaign.id, "pause")
    assert (paused["status"], paused["stats"]) == ("paused", stats(total=6, sent=2, queued=4))
    assert queued(app, redis_conn) == 4  # their jobs are still in Redis

    run_jobs(app)  # every job runs while it is paused, and ends without work

    assert len(read_send_log(send_log)) == 2  # nothing more reached the provider
    rows = message_rows(campaign.id)
    assert [(r.status, r.retry_count) for r in rows[2:]] == [("pending", 0)] * 4
    assert all(r.last_error is None for r in rows)
    assert queued(app, redis_conn) == 0  # no retry, no re-queue
    assert FailedJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    assert detail(client, campaign.id)["status"] == "paused"


def test_resume_sends_the_rest_exactly_once_over_several_cycles(app, client, redis_conn, send_log):
    campaign = make_campaign()
    send(client, campaign.id, 25)
    for cycle in range(5):
        run_jobs(app, max_jobs=3)
        control(client, campaign.id, "pause")
        if cycle % 2:
            run_jobs(app)  # the paused jobs run and end; the others are left queued across the resume
        if cycle == 3:  # jobs of every message, of this turn and of an earlier one: the row says which may claim
            rows = message_rows(campaign.id)
            enqueue_jobs([(row.id, row.job_seq, 0) for row in rows] + [(row.id, row.job_seq - 1, 0) for row in rows])
        resumed = control(client, campaign.id, "resume")
        assert resumed["status"] == "sending"
    run_jobs(app)

    assert sent_ids(send_log) == Counter({row.id: 1 for row in message_rows(campaign.id)})
    assert len(read_send_log(send_log)) == 25  # no attempt was made twice either
    final = detail(client, campaign.id)
    assert (final["status"], final["stats"]) == ("sent", stats(total=25, sent=25))


@pytest.mark.real_only
def test_worker_processes_stop_within_a_second_of_a_pause_and_resume_sends_each_once(
    app, client, spawn_worker, send_log
):
    campaign = make_campaign()
    send(client, campaign.id, 300)
    # About 80 sends a second between them: the campaign outlasts the three cycles below.
    workers = [spawn_worker(burst=False, MOCK_SENDER_LATENCY=0.05, WORKER_CONCURRENCY=2) for _ in range(2)]
    wait_for(lambda: len(read_send_log(send_log)) >= 20, timeout=60)
    for _ in range(3):
        control(client, campaign.id, "pause")
        time.sleep(1)  # sends in flight at the pause finish within a provider round trip
        seen = len(read_send_log(send_log))
        time.sleep(1.5)
        assert len(read_send_log(send_log)) == seen, "a message went to the provider a second after the pause"
        control(client, campaign.id, "resume")
        time.sleep(0.5)
    wait_for(lambda: detail(client, campaign.id)["status"] == "sent", timeout=120)
    for worker in workers:
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
    assert sent_ids(send_log) == Counter({row.id: 1 for row in message_rows(campaign.id)})
    assert len(read_send_log(send_log)) == 300
    assert detail(client, campaign.id)["stats"] == stats(total=300, sent=300)


def test_cancel_cancels_waiting_messages_in_a_batch_and_keeps_sent_ones(app, client, redis_conn, send_log):
    campaign = make_campaign()
    send(client, campaign.id, 5)
    run_jobs(app, max_jobs=2)
    updates = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE OUTBOUND_MESSAGES"):
            updates.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        canceled = control(client, campaign.id, "cancel")
    finally:
        event.remove(db.engine, "before_cursor_execute", count)

    assert len(updates) == 1
    assert (canceled["status"], canceled["stats"]) == ("canceled", stats(total=5, sent=2, canceled=3))
    run_jobs(app)  # the canceled messages' jobs find nothing to send
    assert len(read_send_log(send_log)) == 2
    assert [r.status for r in message_rows(campaign.id)] == ["sent"] * 2 + ["canceled"] * 3
    listed = client.get(f"/campaigns/{campaign.id}/messages", query_string={"status": "canceled"}).get_json()
    assert listed["pagination"]["total"] == 3
    # Irreversible: nothing moves it again, and a repeat answers it unchanged.
    assert control(client, campaign.id, "cancel") == detail(client, campaign.id)
    for action in ("pause", "resume", "retry-failed"):
        error = control(client, campaign.id, action, 409)
        assert error["campaign_status"] == "canceled" and "is canceled" in error["message"]
    refused = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": make_customers(1)})
    assert refused.status_code == 409
    assert detail(client, campaign.id)["stats"] == stats(total=5, sent=2, canceled=3)


@pytest.mark.real_only
def test_a_cancel_does_not_wait_for_a_send_in_flight_which_stays_sent(app, client, spawn_worker, send_log):
    campaign = make_campaign()
    send(client, campaign.id, 1)
    [message] = message_rows(campaign.id)
    spawn_worker(MOCK_SENDER_LATENCY=10)
    wait_for(lambda: message_rows(campaign.id)[0].status == MessageStatus.SENDING, timeout=30, interval=0.05)

    canceled = control(client, campaign.id, "cancel")
    # It answered while the provider still had the message (a 10 s send): its send is shown in flight, not
    # waited for (a cancel that waited would answer it sent).
    assert (canceled["status"], canceled["stats"]) == ("canceled", stats(total=1, sending=1))
    wait_for(lambda: detail(client, campaign.id)["stats"] == stats(total=1, sent=1), timeout=60)
    assert [line["message_id"] for line in read_send_log(send_log)] == [message.id]


def test_a_record_whose_claim_was_lost_still_records_a_send_the_campaign_canceled_meanwhile(app, client, clock):
    campaign = make_campaign()
    send(client, campaign.id, 2)
    first, second = message_rows(campaign.id)
    held = [claim(first), claim(second)]
    clock.advance(minutes=10)
    assert reconcile().in_doubt == 2  # their leases passed: back in line
    control(client, campaign.id, "cancel")
    # The records of those attempts, arriving late: only a message the provider took goes back to sent.
    record(first, held[0], Outcome(MessageStatus.SENT, 0, "Hi", provider="mock", provider_message_id="mock-x"))
    record(second, held[1], Outcome(MessageStatus.FAILED, 0, "Hi", error="refused", error_class="permanent"))
    first, second = message_rows(campaign.id)
    assert (first.status, first.provider_message_id) == ("sent", "mock-x")
    assert (second.status, second.last_error) == ("canceled", None)


@pytest.mark.parametrize(
    ("status", "action"),
    [
        ("draft", "pause"),
        ("sent", "pause"),
        ("failed", "pause"),
        ("draft", "resume"),
        ("sent", "resume"),
        ("failed", "resume"),
        ("sent", "cancel"),
        ("failed", "cancel"),
        ("draft", "retry-failed"),
        ("scheduled", "retry-failed"),
        ("paused", "retry-failed"),
    ],
)
def test_a_control_its_status_does_not_allow_is_409_and_changes_nothing(app, client, redis_conn, status, action):
    campaign = make_campaign(status=status)
    before = detail(client, campaign.id)
    error = control(client, campaign.id, action, 409)
    assert error["code"] == 409 and error["campaign_status"] == status
    assert error["message"].startswith(f"campaign {campaign.id} is {status}; only ")
    assert detail(client, campaign.id) == before
    assert queued(app, redis_conn) == 0


@pytest.mark.parametrize("action", ["pause", "resume", "cancel", "retry-failed"])
def test_a_control_of_an_unknown_campaign_is_404(client, action):
    assert control(client, 999, action, 404)["message"] == "campaign 999 not found"


@pytest.mark.parametrize(("status", "action"), [("paused", "pause"), ("sending", "resume"), ("canceled", "cancel")])
def test_a_control_repeated_answers_the_campaign_unchanged(app, client, status, action):
    campaign = make_campaign(status=status)
    before = detail(client, campaign.id)
    assert control(client, campaign.id, action) == before


def test_a_paused_scheduled_campaign_is_not_dispatched_and_resumes_as_its_time_says(app, client, clock, redis_conn):
    at = clock.now() + timedelta(minutes=10)
    campaign = make_campaign(status="scheduled", scheduled_at=at)
    send(client, campaign.id, 3)
    assert control(client, campaign.id, "pause")["status"] == "paused"
    assert control(client, campaign.id, "resume")["status"] == "scheduled"  # its time is still ahead
    control(client, campaign.id, "pause")

    clock.advance(minutes=11)
    assert dispatch_scheduled_campaign(campaign.id) == "not due, or already dispatched"  # its trigger
    report = reconcile()
    assert report.dispatched == [] and report.requeued == 0
    assert detail(client, campaign.id)["status"] == "paused"
    assert queued(app, redis_conn) == 0

    resumed = control(client, campaign.id, "resume")  # its time has passed: it starts now
    assert (resumed["status"], resumed["stats"]) == ("sending", stats(total=3, queued=3))
    assert queued(app, redis_conn) == 3


def test_the_reconciler_leaves_paused_and_canceled_campaigns_alone(app, client, clock, redis_conn):
    paused, canceled = make_campaign(), make_campaign()
    send(client, paused.id, 2)
    send(client, canceled.id, 2)
    run_jobs(app, max_jobs=1)  # one message of the first campaign sent
    control(client, paused.id, "pause")
    control(client, canceled.id, "cancel")
    redis_conn.flushdb()  # every job lost
    clock.advance(seconds=current_app.config["STALE_AFTER"] + 60)

    report = reconcile()

    assert (report.requeued, report.finalized) == (0, {})
    assert queued(app, redis_conn) == 0
    assert detail(client, paused.id)["status"] == "paused"  # not finished while a message is pending
    assert detail(client, canceled.id)["status"] == "canceled"


def test_resume_of_a_campaign_with_nothing_pending_finishes_it(app, client):
    campaign = make_campaign()
    send(client, campaign.id, 2)
    run_jobs(app)
    db.session.execute(text("UPDATE campaigns SET status = 'paused' WHERE id = :id"), {"id": campaign.id})
    db.session.commit()
    resumed = control(client, campaign.id, "resume")
    assert (resumed["status"], resumed["stats"]) == ("sent", stats(total=2, sent=2))


def concurrently(live_server: str, requests: list[tuple[int, str]]) -> list[httpx.Response]:
    """POST each `(campaign_id, action)` from its own thread, released together."""
    barrier = threading.Barrier(len(requests))
    answers: list[httpx.Response | None] = [None] * len(requests)

    def run(i: int, campaign_id: int, action: str) -> None:
        with httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {TEST_API_KEY}"}) as http:
            barrier.wait()
            answers[i] = http.post(f"/campaigns/{campaign_id}/{action}", timeout=30)

    threads = [threading.Thread(target=run, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.real_only
def test_two_pauses_at_once_both_answer_the_paused_campaign_after_one_transition(app, client, live_server):
    campaign = make_campaign()
    send(client, campaign.id, 3)
    moves = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE CAMPAIGNS") and cursor.rowcount == 1:
            moves.append(statement)

    event.listen(db.engine, "after_cursor_execute", count)
    try:
        answers = concurrently(live_server, [(campaign.id, "pause"), (campaign.id, "pause")])
    finally:
        event.remove(db.engine, "after_cursor_execute", count)
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["status"] for a in answers] == ["paused", "paused"]
    assert len(moves) == 1


@pytest.mark.real_only
def test_cancel_and_resume_at_once_end_canceled_with_nothing_pending(app, client, live_server):
    campaigns = [make_campaign() for _ in range(8)]
    for campaign in campaigns:
        send(client, campaign.id, 3)
        control(client, campaign.id, "pause")
    for campaign in campaigns:
        cancel, resume = concurrently(live_server, [(campaign.id, "cancel"), (campaign.id, "resume")])
        assert cancel.status_code == 200 and cancel.json()["status"] == "canceled"
        # The resume came first (200: sending, or already canceled when the cancel committed before its
        # answer was read) or second (409 naming canceled); never anything else.
        assert (resume.status_code, resume.json().get("status"), resume.json().get("campaign_status")) in (
            (200, "sending", None),
            (200, "canceled", None),
            (409, "Conflict", "canceled"),
        )
        final = detail(client, campaign.id)
        assert final["status"] == "canceled"
        assert final["stats"]["pending"] == final["stats"]["queued"] == 0
        assert final["stats"]["canceled"] + final["stats"]["sent"] == 3


def test_lifecycle_moves_a_paused_campaign_only_to_its_targets(app):
    campaign = make_campaign(status=CampaignStatus.PAUSED)
    assert lifecycle.start_sending(campaign.id) is False  # a send does not resume it
    assert lifecycle.pause(campaign.id) is False
    assert lifecycle.resume(campaign.id) == CampaignStatus.SENDING
    db.session.commit()
    assert db.session.get(Campaign, campaign.id).status == CampaignStatus.SENDING


def test_a_kept_failure_receipt_keeps_its_class_until_its_message_takes_it(app, client):
    campaign = make_campaign()
    send(client, campaign.id, 1)
    early = receipts.Receipt(
        "twilio", "SM-early", MessageStatus.UNDELIVERED, error_code="30005", error_class="permanent"
    )
    assert receipts.record([early]) == {"applied": 0, "unchanged": 0, "kept": 1}
    [message] = message_rows(campaign.id)
    # The send's record comes after the receipt.
    outcome = Outcome(MessageStatus.SENT, 0, "Hi", provider="twilio", provider_message_id="SM-early")
    assert record(message, claim(message), outcome).receipt_waiting
    assert receipts.apply_waiting("twilio", "SM-early") == 1
    [message] = message_rows(campaign.id)
    assert (message.status, message.error_code, message.error_class) == ("undelivered", "30005", "permanent")
    answer = client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()
    assert (answer["requeued"], answer["not_retryable"]) == (0, 1)


def test_the_openapi_document_lists_the_new_statuses_and_the_retry_answer(client):
    spec = client.get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    assert schemas["CampaignDetail"]["properties"]["status"]["enum"] == list(CampaignStatus.ALL)
    assert {"paused", "canceled"} <= set(CampaignStatus.ALL)
    assert "canceled" in schemas["Message"]["properties"]["status"]["enum"]
    assert "canceled" in schemas["Stats"]["required"]
    assert set(schemas["RetryFailedResult"]["required"]) == {"campaign", "requeued", "not_retryable", "unknown_left"}
    retry = spec["paths"]["/campaigns/{campaign_id}/retry-failed"]["post"]
    assert {"200", "404", "409"} <= set(retry["responses"])
    for action in ("pause", "resume", "cancel"):
        responses = spec["paths"][f"/campaigns/{{campaign_id}}/{action}"]["post"]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/CampaignDetail"
        }
        assert {"404", "409"} <= set(responses)
