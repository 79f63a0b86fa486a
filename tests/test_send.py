"""POST /campaigns/{id}/send: rows, jobs, and every way it refuses."""

from collections import Counter

import pytest
from flask import current_app
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue
from sqlalchemy import func, select

from app.extensions import db
from app.messaging.reconcile import reconcile
from app.models import OutboundMessage
from app.queues import redis_options
from tests.conftest import read_send_log
from tests.factories import make_campaign, make_customers
from tests.helpers import job_ids_of, stats

CLOSED_PORT = 1  # nothing listens there: connections are refused at once


def queued_job_ids(redis_conn) -> list[str]:
    """The send jobs waiting in the app's send queue."""
    return Queue(current_app.config["SEND_QUEUE"], connection=redis_conn).job_ids


def test_send_creates_pending_rows_and_one_job_each(client, redis_conn):
    ids = make_customers(3)
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert response.status_code == 202
    assert response.get_json() == {
        "campaign_id": campaign.id,
        "messages_queued": 3,
        "messages_left_for_reconciler": 0,
        "skipped_opted_out": 0,
        "skipped_frequency_cap": 0,
        "adding_recipients": False,
        "status": "sending",
    }
    messages = db.session.scalars(db.select(OutboundMessage).order_by(OutboundMessage.id)).all()
    assert [(m.customer_id, m.status, m.retry_count) for m in messages] == [(i, "queued", 0) for i in ids]
    assert sorted(queued_job_ids(redis_conn)) == sorted(job_ids_of(messages))
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "sending"
    assert detail["stats"] == stats(total=3, queued=3)


def test_repeat_send_creates_no_duplicates(client, redis_conn):
    ids = make_customers(3)
    campaign = make_campaign()
    client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids[:2]})
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids + ids})
    assert response.get_json()["messages_queued"] == 1
    again = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert again.status_code == 202 and again.get_json()["messages_queued"] == 0
    assert db.session.scalar(db.select(db.func.count()).select_from(OutboundMessage)) == 3
    assert len(queued_job_ids(redis_conn)) == 3


def test_unknown_campaign_is_404(client):
    response = client.post("/campaigns/999/send", json={"customer_ids": [1]})
    assert response.status_code == 404


@pytest.mark.parametrize("status", ["sent", "failed", "paused", "canceled"])
def test_finished_paused_or_canceled_campaign_is_409(client, status):
    ids = make_customers(1)
    campaign = make_campaign(status=status)
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert response.status_code == 409
    assert f"is {status};" in response.get_json()["message"]
    assert response.get_json()["campaign_status"] == status
    assert db.session.scalar(select(func.count()).select_from(OutboundMessage)) == 0


def test_ids_of_no_customer_are_listed_and_nothing_is_created(client, redis_conn):
    ids = make_customers(2)
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [ids[0], 998, 999]})
    assert response.status_code == 422
    assert "998, 999" in response.get_json()["message"]
    body = response.get_json()
    assert body["missing_customer_ids"] == [998, 999]
    assert body["errors"] == {"customer_ids": ["no customer with id 998, 999"]}
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "draft" and detail["stats"]["total"] == 0
    assert queued_job_ids(redis_conn) == []


@pytest.mark.parametrize(
    "body",
    [
        {"customer_ids": []},
        {"customer_ids": ["1"]},
        {"customer_ids": [1.5]},
        {"customer_ids": [True]},
        {"customer_ids": [0]},
        {"customer_ids": [10**30]},
        {"customer_ids": "1,2"},
        {"customer_ids": None},
        {},
        [],
        {"customer_ids": [1], "audience": {"all": True}},
        {"audience": {}},
        {"audience": {"all": False}},
        {"audience": {"all": True, "location": "Nairobi"}},
    ],
)
def test_malformed_send_is_422_and_changes_nothing(client, body):
    make_customers(1)
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json=body)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["message"]
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "draft"


def test_too_many_ids_points_to_audiences(client, app):
    app.config["MAX_SEND_IDS"] = 3
    ids = make_customers(4)
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert response.status_code == 422
    assert "audience" in response.get_json()["message"]


def test_send_to_location_audience(client, redis_conn):
    nairobi = make_customers(2, location="Nairobi")
    make_customers(3, location="Mombasa")
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"location": "Nairobi"}})
    assert response.get_json()["messages_queued"] == 2
    rows = db.session.scalars(db.select(OutboundMessage.customer_id).order_by(OutboundMessage.customer_id)).all()
    assert rows == nairobi


def test_send_to_everyone_then_again_adds_only_new_customers(client, redis_conn):
    make_customers(3)
    campaign = make_campaign()
    assert (
        client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}}).get_json()["messages_queued"]
        == 3
    )
    make_customers(2)
    assert (
        client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}}).get_json()["messages_queued"]
        == 2
    )
    assert len(queued_job_ids(redis_conn)) == 5


def test_audience_matching_nobody_on_a_draft_is_422(client):
    make_customers(1, location="Nairobi")
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"location": "Atlantis"}})
    assert response.status_code == 422
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "draft"


def test_a_send_bigger_than_the_window_queues_one_window_and_the_rest_follows(client, app, redis_conn, work):
    app.config["SEND_WINDOW"] = 5
    make_customers(12)
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}})
    assert response.get_json()["messages_queued"] == 12
    assert response.get_json()["messages_left_for_reconciler"] == 0
    # Redis holds the window, the oldest messages first; the rest wait in the database.
    first = db.session.scalars(db.select(OutboundMessage).order_by(OutboundMessage.id).limit(5)).all()
    assert queued_job_ids(redis_conn) == job_ids_of(first)
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"] == stats(total=12, queued=5, pending=7)
    work()
    detail = client.get(f"/campaigns/{campaign.id}").get_json()
    assert detail["status"] == "sent"
    assert detail["stats"]["sent"] == 12


def redis_down(app) -> Redis:
    """A connection to a Redis that is down, built as the web builds its own."""
    return Redis(port=CLOSED_PORT, **redis_options(app.config))


class FailingFrom:
    """`conn`, except that its pipelines fail from the `n`th execute on: Redis went away mid-send."""

    def __init__(self, conn, n: int) -> None:
        self.conn, self.n, self.executed = conn, n, 0

    def pipeline(self, *args, **kwargs):
        pipe = self.conn.pipeline(*args, **kwargs)
        execute = pipe.execute

        def failing_execute(*a, **k):
            self.executed += 1
            if self.executed >= self.n:
                pipe.reset()
                raise RedisConnectionError("Redis went away")
            return execute(*a, **k)

        pipe.execute = failing_execute
        return pipe

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_send_while_redis_is_down_says_nothing_was_queued(client, app, clock, redis_conn, work, send_log):
    ids = make_customers(2)
    campaign = make_campaign()
    app.extensions["redis"] = redis_down(app)
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    # The rows are committed: the answer is 202, and says who queues them.
    assert response.status_code == 202
    assert response.get_json() == {
        "campaign_id": campaign.id,
        "messages_queued": 0,
        "messages_left_for_reconciler": 2,
        "skipped_opted_out": 0,
        "skipped_frequency_cap": 0,
        "adding_recipients": False,
        "status": "sending",
    }
    # In its window, without jobs: the reconciler puts them back in line.
    assert client.get(f"/campaigns/{campaign.id}").get_json()["stats"]["queued"] == 2

    app.extensions["redis"] = redis_conn
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 2
    work()
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"
    assert len(read_send_log(send_log)) == 2


def test_send_interrupted_part_way_counts_only_the_jobs_in_redis(client, app, clock, redis_conn, work, send_log):
    app.config["ENQUEUE_BATCH_SIZE"] = 2
    ids = make_customers(5)
    campaign = make_campaign()
    app.extensions["redis"] = FailingFrom(redis_conn, n=2)  # the first batch of two gets through
    response = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids})
    assert response.status_code == 202
    body = response.get_json()
    assert (body["messages_queued"], body["messages_left_for_reconciler"]) == (2, 3)
    assert len(queued_job_ids(redis_conn)) == 2

    app.extensions["redis"] = redis_conn
    work()
    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().requeued == 3
    work()
    assert client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent"
    sends = Counter(a["message_id"] for a in read_send_log(send_log))
    assert len(sends) == 5 and set(sends.values()) == {1}


def test_large_send_while_redis_is_down_leaves_its_window_for_the_reconciler(client, app):
    app.config["SEND_WINDOW"] = 2
    make_customers(5)
    campaign = make_campaign()
    app.extensions["redis"] = redis_down(app)
    body = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"all": True}}).get_json()
    # The first window's two jobs did not reach Redis; the other three wait their turn in the database.
    assert (body["messages_queued"], body["messages_left_for_reconciler"]) == (3, 2)
