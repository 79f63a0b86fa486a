"""Scheduled campaigns: status, triggers in rq-scheduler, and dispatch that is never early and never twice."""

from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis

from app.messaging.reconcile import reconcile
from app.messaging.triggers import dispatch_job_id, get_scheduler
from app.queues import get_control_queue
from tests.factories import make_customers
from tests.helpers import stats


def iso(dt: datetime) -> str:
    return dt.isoformat()


def trigger_time(campaign_id):
    """When rq-scheduler will fire the campaign's dispatch, or None."""
    for job, at in get_scheduler().get_jobs(with_times=True):
        if job.id == dispatch_job_id(campaign_id):
            return at.replace(tzinfo=UTC)
    return None


def create(client, **fields):
    body = {"name": "Later", "channel": "sms", "base_template": "Hi {first_name}", **fields}
    return client.post("/campaigns", json=body)


def fire_trigger(campaign_id, work):
    """What rq-scheduler does when the trigger's time comes: queue the dispatch job; then run it."""
    get_control_queue().enqueue(
        "app.messaging.jobs.dispatch_scheduled_campaign", campaign_id, job_id=dispatch_job_id(campaign_id)
    )
    work()


def test_future_schedule_makes_campaign_scheduled_with_a_trigger(client, clock, redis_conn):
    at = clock.now() + timedelta(hours=1)
    response = create(client, scheduled_at=iso(at))
    assert response.status_code == 201
    body = response.get_json()
    assert body["status"] == "scheduled"
    assert body["scheduled_at"] == "2030-01-01T13:00:00+00:00"
    assert trigger_time(body["id"]) == at


def test_naive_time_is_utc_and_offsets_are_converted(client, clock):
    naive = create(client, scheduled_at="2030-01-01T15:30:00").get_json()
    assert naive["scheduled_at"] == "2030-01-01T15:30:00+00:00"
    nairobi = create(client, scheduled_at="2030-01-01T18:30:00+03:00").get_json()
    assert nairobi["scheduled_at"] == "2030-01-01T15:30:00+00:00"


def test_past_schedule_is_422(client, clock):
    response = create(client, scheduled_at=iso(clock.now() - timedelta(seconds=1)))
    assert response.status_code == 422
    assert "scheduled_at" in response.get_json()["message"]
    assert client.get("/campaigns").get_json()["pagination"]["total"] == 0


def test_reschedule_moves_the_trigger_and_null_unschedules(client, clock, redis_conn):
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(hours=1))).get_json()
    later = clock.now() + timedelta(hours=5)
    moved = client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": iso(later)}).get_json()
    assert moved["status"] == "scheduled"
    assert trigger_time(campaign["id"]) == later
    draft = client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": None}).get_json()
    assert draft["status"] == "draft" and draft["scheduled_at"] is None
    assert trigger_time(campaign["id"]) is None
    again = client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": iso(later)}).get_json()
    assert again["status"] == "scheduled"


def test_patch_to_past_time_is_422_and_keeps_schedule(client, clock, redis_conn):
    at = clock.now() + timedelta(hours=1)
    campaign = create(client, scheduled_at=iso(at)).get_json()
    response = client.patch(
        f"/campaigns/{campaign['id']}", json={"scheduled_at": iso(clock.now() - timedelta(hours=1))}
    )
    assert response.status_code == 422
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["scheduled_at"] == iso(at)


def test_send_before_the_time_stores_recipients_and_queues_nothing(client, clock, redis_conn, send_queue):
    ids = make_customers(3)
    at = clock.now() + timedelta(hours=1)
    campaign = create(client, scheduled_at=iso(at)).get_json()
    first = client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids[:2]})
    assert first.status_code == 202
    assert first.get_json() == {
        "campaign_id": campaign["id"],
        "messages_queued": 0,
        "messages_left_for_reconciler": 0,
        "messages_scheduled": 2,
        "skipped_opted_out": 0,
        "skipped_frequency_cap": 0,
        "adding_recipients": False,
        "status": "scheduled",
        "scheduled_at": iso(at),
    }
    second = client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids}).get_json()
    assert second["messages_scheduled"] == 1
    assert send_queue.count == 0
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["stats"] == stats(total=3, pending=3)


def test_dispatch_never_runs_before_the_time(client, clock, redis_conn, work, send_log):
    ids = make_customers(2)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=10))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    clock.advance(minutes=9, seconds=59)
    fire_trigger(campaign["id"], work)  # an early trigger (clock skew, a stale job)
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "scheduled"
    assert not send_log.exists()
    clock.advance(seconds=1)
    fire_trigger(campaign["id"], work)
    detail = client.get(f"/campaigns/{campaign['id']}").get_json()
    assert detail["status"] == "sent"
    assert detail["stats"]["sent"] == 2


def test_trigger_that_fires_twice_dispatches_once(client, clock, redis_conn, work, send_log):
    from tests.conftest import read_send_log

    ids = make_customers(3)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=1))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    clock.advance(minutes=2)
    queue = get_control_queue()
    for n in range(3):  # two scheduler processes and a retry, say
        queue.enqueue("app.messaging.jobs.dispatch_scheduled_campaign", campaign["id"], job_id=f"trigger-{n}")
    work()
    assert len(read_send_log(send_log)) == 3
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "sent"


def test_rescheduled_campaign_is_not_dispatched_at_its_old_time(client, clock, redis_conn, work):
    ids = make_customers(1)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=5))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": iso(clock.now() + timedelta(hours=2))})
    clock.advance(minutes=6)
    fire_trigger(campaign["id"], work)  # an old trigger that was not removed
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "scheduled"


def test_unscheduled_campaign_is_not_dispatched(client, clock, redis_conn, work):
    ids = make_customers(1)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=5))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": None})
    clock.advance(minutes=6)
    fire_trigger(campaign["id"], work)
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "draft"


def test_scheduled_campaign_without_recipients_fails_and_says_why(client, clock, redis_conn, work):
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=1))).get_json()
    clock.advance(minutes=1)
    fire_trigger(campaign["id"], work)
    detail = client.get(f"/campaigns/{campaign['id']}").get_json()
    assert detail["status"] == "failed"
    assert "no recipients" in detail["status_reason"]


def test_send_on_a_due_scheduled_campaign_starts_it_with_stored_recipients(client, clock, redis_conn, work):
    ids = make_customers(3)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=1))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids[:2]})
    clock.advance(minutes=2)  # due, but its trigger has not run yet
    response = client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids[2:]}).get_json()
    assert response == {
        "campaign_id": campaign["id"],
        "messages_queued": 3,
        "messages_left_for_reconciler": 0,
        "skipped_opted_out": 0,
        "skipped_frequency_cap": 0,
        "adding_recipients": False,
        "status": "sending",
    }
    assert trigger_time(campaign["id"]) is None
    work()
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["stats"]["sent"] == 3


def test_dispatch_does_not_wait_behind_queued_sends(client, clock, app, redis_conn, send_queue):
    from app.messaging.app_worker import build_worker
    from app.messaging.triggers import schedule_dispatch

    busy = client.post("/campaigns", json={"name": "Busy", "channel": "sms", "base_template": "Hi"}).get_json()
    client.post(f"/campaigns/{busy['id']}/send", json={"customer_ids": make_customers(5)})
    ids = make_customers(1)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(minutes=1))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    clock.advance(minutes=1)
    schedule_dispatch(campaign["id"], datetime.now(UTC) - timedelta(seconds=1))  # due for rq-scheduler
    get_scheduler().enqueue_jobs()  # rq-scheduler's tick
    build_worker(app).work(burst=True, max_jobs=1, logging_level="WARNING")  # one job only: the dispatch
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "sending"
    assert send_queue.count == 6


@pytest.mark.parametrize(
    ("scheduled_at", "status"),
    [
        ("9999-12-31T23:59:59-12:00", 422),  # after the last representable UTC time
        ("0001-01-01T00:00:00+14:00", 422),  # before the first
        ("9999-12-31T23:59:59.999999Z", 422),  # no room left to round the trigger up to a second
        ("9999-12-29T23:59:59.5+01:00", 201),
        ("+10000-01-01T00:00:00Z", 422),
    ],
)
def test_extreme_schedule_times_are_201_or_422(client, clock, redis_conn, scheduled_at, status):
    response = create(client, scheduled_at=scheduled_at)
    assert response.status_code == status, response.get_json()
    if status == 422:
        assert "scheduled_at" in response.get_json()["message"]
        assert client.get("/campaigns").get_json()["pagination"]["total"] == 0
    else:
        campaign = response.get_json()
        assert campaign["status"] == "scheduled"
        assert trigger_time(campaign["id"]) is not None
        patched = client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": "9999-12-31T23:59:59-12:00"})
        assert patched.status_code == 422


def test_rescheduling_while_redis_is_down_still_dispatches_at_the_new_time(app, client, clock, redis_conn, work):
    """The trigger cannot be moved while Redis is down: the change is kept (200), and the reconciler
    dispatches the campaign at its new time, not at the old one."""
    ids = make_customers(2)
    campaign = create(client, scheduled_at=iso(clock.now() + timedelta(hours=1))).get_json()
    client.post(f"/campaigns/{campaign['id']}/send", json={"customer_ids": ids})
    app.extensions["redis"] = Redis(port=1)  # nothing listens there
    moved = client.patch(f"/campaigns/{campaign['id']}", json={"scheduled_at": iso(clock.now() + timedelta(hours=2))})
    app.extensions["redis"] = redis_conn
    assert moved.status_code == 200
    assert moved.get_json()["scheduled_at"] == "2030-01-01T14:00:00+00:00"

    clock.advance(hours=1, seconds=1)  # the old time: its trigger, still in Redis, fires
    fire_trigger(campaign["id"], work)
    assert reconcile().dispatched == []
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "scheduled"
    clock.advance(hours=1)
    assert reconcile().dispatched == [campaign["id"]]
    work()
    assert client.get(f"/campaigns/{campaign['id']}").get_json()["status"] == "sent"
