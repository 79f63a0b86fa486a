"""A send to an audience larger than `RECIPIENT_BATCH` answers after the first batch and adds the rest
after its answer, batch by batch, while the first messages are sent: nothing is lost (a lost job, a
failed enqueue, two runs at once), nobody gets two messages, and the campaign does not end before its
last batch. Batches are 10 customers here, so a few dozen customers take the path a million take."""

from __future__ import annotations

from collections import Counter

import pytest
from flask import current_app
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from sqlalchemy import func, select

from app.customers.optouts import opt_out_ids
from app.extensions import db
from app.messaging import recipient_batches
from app.messaging.reconcile import reconcile
from app.models import Campaign, OutboundMessage
from tests.conftest import read_send_log, wait_for
from tests.factories import bulk_customers, make_campaign, make_customers

BATCH = 10


@pytest.fixture(autouse=True)
def small_batches(app):
    app.config["RECIPIENT_BATCH"] = BATCH


def send(client, campaign_id: int, audience: dict | None = None, status: int = 202) -> dict:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"audience": audience or {"location": "Nairobi"}})
    assert response.status_code == status, response.get_json()
    return response.get_json()


def detail(client, campaign_id: int) -> dict:
    return client.get(f"/campaigns/{campaign_id}").get_json()


def customers_messaged(campaign_id: int) -> Counter:
    db.session.rollback()
    return Counter(
        db.session.scalars(select(OutboundMessage.customer_id).where(OutboundMessage.campaign_id == campaign_id))
    )


def sent_once_each(send_log, campaign_id: int) -> Counter:
    return Counter(line["message_id"] for line in read_send_log(send_log) if line["campaign_id"] == campaign_id)


def control_jobs(app) -> list[str]:
    return Queue(app.config["CONTROL_QUEUE"], connection=app.extensions["redis"]).job_ids


def test_a_large_audience_is_answered_after_its_first_batch_and_the_rest_is_added_after(app, client, work, send_log):
    ids = make_customers(35)
    make_customers(4, location="Mombasa")
    campaign = make_campaign()

    answer = send(client, campaign.id)
    assert answer["messages_queued"] == BATCH and answer["adding_recipients"] is True
    shown = detail(client, campaign.id)
    assert shown["status"] == "sending" and shown["stats"]["total"] == BATCH
    assert shown["last_send"]["adding"] is True and shown["last_send"]["added"] == BATCH
    assert any(job.startswith(f"add_recipients-{campaign.id}-") for job in control_jobs(app))

    # The first batch is sent while the rest waits: the campaign does not end with only those.
    work([current_app.config["SEND_QUEUE"]])
    shown = detail(client, campaign.id)
    assert shown["stats"]["sent"] == BATCH and shown["status"] == "sending"

    work()
    shown = detail(client, campaign.id)
    assert shown["status"] == "sent" and shown["stats"]["sent"] == 35
    assert shown["last_send"]["adding"] is False and shown["last_send"]["added"] == 35
    assert customers_messaged(campaign.id) == Counter(ids)  # every one of the audience, once, nobody else
    assert set(sent_once_each(send_log, campaign.id).values()) == {1}
    row = db.session.get(Campaign, campaign.id)
    assert (row.adding_after, row.adding_audience, row.adding_at) == (None, None, None)


def test_an_audience_within_one_batch_is_added_in_the_request(client, work):
    make_customers(BATCH - 1)
    campaign = make_campaign()
    answer = send(client, campaign.id)
    assert (answer["messages_queued"], answer["adding_recipients"]) == (BATCH - 1, False)
    assert detail(client, campaign.id)["last_send"]["adding"] is False
    work()
    assert detail(client, campaign.id)["status"] == "sent"


def test_opt_outs_and_nothing_to_send_are_counted_over_every_batch(client, work):
    ids = make_customers(45)
    opt_out_ids(ids[:25], "sms", "test")  # the first two batches and a half: nobody to send to there
    campaign = make_campaign()

    # The request goes on past batches that created nothing, so that it starts with something to send.
    answer = send(client, campaign.id)
    assert answer["messages_queued"] == 5 and answer["skipped_opted_out"] == 25 and answer["adding_recipients"]
    work()
    shown = detail(client, campaign.id)
    assert shown["status"] == "sent" and shown["stats"]["sent"] == 20
    assert shown["last_send"] == {**shown["last_send"], "added": 20, "skipped_opted_out": 25, "adding": False}

    # Everyone opted out, over several batches: still "nothing to send", and nothing changed.
    everyone_out = make_campaign()
    opt_out_ids(ids, "sms", "test")
    refused = send(client, everyone_out.id, status=422)
    assert refused["skipped_opted_out"] == 45
    assert detail(client, everyone_out.id)["status"] == "draft" and customers_messaged(everyone_out.id) == Counter()


def test_a_lost_add_job_is_enqueued_again_by_the_reconciler_and_nothing_is_lost(app, client, work, clock, redis_conn):
    ids = make_customers(32)
    campaign = make_campaign()
    assert send(client, campaign.id)["adding_recipients"]
    redis_conn.flushdb()  # the add job, and the first window's jobs, are gone

    reconcile()  # too early: the adding is not stalled yet
    assert not any(job.startswith("add_recipients-") for job in control_jobs(app))
    clock.advance(seconds=31)
    report = reconcile()
    assert report.resumed_adding == [campaign.id]
    clock.advance(minutes=10)  # past STALE_AFTER: the first window's lost jobs are queued again too
    reconcile()
    work()
    reconcile()
    assert detail(client, campaign.id)["status"] == "sent"
    assert customers_messaged(campaign.id) == Counter(ids)


def test_a_send_whose_add_job_cannot_be_enqueued_still_sends_everyone(app, client, work, clock, monkeypatch):
    ids = make_customers(25)
    campaign = make_campaign()

    def refuse(*args, **kwargs):
        raise RedisConnectionError("Redis is down")

    with monkeypatch.context() as patch:
        patch.setattr(Queue, "enqueue", refuse)  # the commit is done; the enqueue after it fails
        answer = send(client, campaign.id)
    assert answer["adding_recipients"] is True
    assert not any(job.startswith("add_recipients-") for job in control_jobs(app))

    clock.advance(seconds=31)
    reconcile()
    work()
    assert detail(client, campaign.id)["status"] == "sent"
    assert customers_messaged(campaign.id) == Counter(ids)


def test_a_cancel_stops_the_adding_and_a_pause_does_not(client, work):
    make_customers(30)
    canceled = make_campaign()
    send(client, canceled.id)
    assert client.post(f"/campaigns/{canceled.id}/cancel").status_code == 200
    work()
    shown = detail(client, canceled.id)
    assert shown["status"] == "canceled" and shown["stats"]["total"] == BATCH  # nothing added after the cancel
    assert shown["last_send"]["adding"] is False

    paused = make_campaign(name="paused")
    send(client, paused.id)
    assert client.post(f"/campaigns/{paused.id}/pause").status_code == 200
    work()
    shown = detail(client, paused.id)
    assert shown["status"] == "paused" and shown["stats"]["total"] == 30 and shown["stats"]["sent"] == 0
    assert client.post(f"/campaigns/{paused.id}/resume").status_code == 200
    work()
    assert detail(client, paused.id)["stats"]["sent"] == 30


def test_a_second_audience_send_while_adding_is_a_409_and_ids_still_go(client, work):
    make_customers(25)
    others = make_customers(2, location="Kisumu")
    campaign = make_campaign()
    send(client, campaign.id)
    refused = send(client, campaign.id, {"location": "Kisumu"}, status=409)
    assert "still adding the recipients" in refused["message"]
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": others})
    assert response.status_code == 202 and response.get_json()["adding_recipients"] is False
    work()
    shown = detail(client, campaign.id)
    assert shown["status"] == "sent" and shown["stats"]["sent"] == 27


def test_a_segment_is_added_as_it_was_when_sent(client, work):
    make_customers(25)
    make_customers(5, location="Kisumu")
    spec = {"field": "location", "op": "eq", "value": "Nairobi"}
    segment = client.post("/segments", json={"name": "city", "filter": spec}).get_json()
    campaign = make_campaign()
    assert send(client, campaign.id, {"segment_id": segment["id"]})["adding_recipients"]
    # Changed and then deleted while the send adds: the send keeps the filter it was sent with.
    changed = {"filter": {"field": "location", "op": "eq", "value": "Kisumu"}}
    assert client.patch(f"/segments/{segment['id']}", json=changed).status_code == 200
    assert client.delete(f"/segments/{segment['id']}").status_code == 204
    work()
    shown = detail(client, campaign.id)
    assert shown["status"] == "sent" and shown["stats"]["sent"] == 25


def test_a_scheduled_campaign_adds_its_audience_before_its_time(client, work, clock):
    make_customers(25)
    campaign = make_campaign()
    later = clock.now().replace(year=clock.now().year + 1)
    assert client.patch(f"/campaigns/{campaign.id}", json={"scheduled_at": later.isoformat()}).status_code == 200
    answer = send(client, campaign.id)
    assert (answer["messages_scheduled"], answer["adding_recipients"], answer["status"]) == (BATCH, True, "scheduled")
    work()
    shown = detail(client, campaign.id)
    assert shown["status"] == "scheduled" and shown["stats"]["pending"] == 25 and shown["last_send"]["added"] == 25

    # Taken back to draft while it adds: it keeps every recipient its send stored, as before batches.
    unscheduled = make_campaign(name="unscheduled")
    assert client.patch(f"/campaigns/{unscheduled.id}", json={"scheduled_at": later.isoformat()}).status_code == 200
    assert send(client, unscheduled.id)["adding_recipients"]
    assert client.patch(f"/campaigns/{unscheduled.id}", json={"scheduled_at": None}).get_json()["status"] == "draft"
    work()
    shown = detail(client, unscheduled.id)
    assert shown["status"] == "draft" and shown["stats"]["pending"] == 25 and shown["last_send"]["adding"] is False


@pytest.mark.real_only
def test_two_add_jobs_at_once_add_each_customer_once_and_count_each_once(app, client, spawn_worker, send_log):
    """A reconciler that re-enqueues the adding while its first job still runs: two workers add batches of
    one campaign at once. The campaign's row lock serializes their batches; the counts are not doubled."""
    app.config["RECIPIENT_BATCH"] = 50
    ids = bulk_customers(2000, location="Eldoret")
    campaign = make_campaign()
    assert send(client, campaign.id, {"location": "Eldoret"})["adding_recipients"]
    row = db.session.get(Campaign, campaign.id)
    recipient_batches.enqueue(campaign.id, -1)  # a second job for the same adding
    workers = [spawn_worker(burst=False, RECIPIENT_BATCH="50", WORKER_CONCURRENCY="8") for _ in range(2)]
    assert row.adding_after is not None
    wait_for(lambda: detail(client, campaign.id)["status"] == "sent", timeout=180, interval=0.5)
    for worker in workers:
        worker.terminate()
        worker.wait(30)
    assert customers_messaged(campaign.id) == Counter(ids)
    shown = detail(client, campaign.id)
    assert shown["last_send"]["added"] == 2000 and shown["stats"]["sent"] == 2000
    assert set(sent_once_each(send_log, campaign.id).values()) == {1}
    assert db.session.scalar(select(func.count()).where(OutboundMessage.campaign_id == campaign.id)) == 2000
