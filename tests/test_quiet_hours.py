"""Quiet hours (`QUIET_HOURS`, in the recipient's local time, from their number): no message of a campaign
that respects them reaches a provider inside the window; it waits, pending with its retries, out of its
campaign's window until the window's end (a refill of the campaign's window scheduled in RQ for then),
and the wait survives a flushed Redis."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from sqlalchemy import select

from app.extensions import db
from app.messaging.reconcile import reconcile
from app.messaging.send import throttle
from app.messaging.send.quiet_hours import quiet_until, recipient_zones, window_end
from app.models import OutboundMessage
from config import TimeWindow, quiet_hours
from tests.conftest import read_send_log
from tests.factories import make_campaign, make_customer, make_customers
from tests.helpers import stats as expected_stats

NAIROBI = ZoneInfo("Africa/Nairobi")  # UTC+3 all year
NIGHT = quiet_hours("20:00-08:00")
# 20:05 in Nairobi; 08:00 there the next morning is 05:00 UTC.
EVENING = datetime(2030, 1, 1, 17, 5, tzinfo=UTC)
MORNING = datetime(2030, 1, 2, 5, 0, tzinfo=UTC)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def messages(campaign_id: int) -> list[OutboundMessage]:
    db.session.rollback()
    return list(db.session.scalars(select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id)))


def send_to(client, campaign_id: int, ids: list[int]) -> None:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    assert response.status_code == 202, response.get_json()


def detail(client, campaign_id: int) -> dict:
    return client.get(f"/campaigns/{campaign_id}").get_json()


@pytest.fixture
def night(app):
    """Quiet hours from 20:00 to 08:00, Nairobi by default."""
    app.config.update(QUIET_HOURS=NIGHT, DEFAULT_TIMEZONE="Africa/Nairobi")


# --- the window and the recipient's time zone ---


def test_the_setting_reads_a_window_that_may_cross_midnight():
    assert quiet_hours("") is None
    assert quiet_hours("20:00-08:00") == TimeWindow(datetime.min.time().replace(hour=20), NIGHT.end)
    assert str(quiet_hours(" 13:30 - 14:00 ")) == "13:30-14:00"


@pytest.mark.parametrize(
    ("phone", "zones"),
    [
        ("+254712345678", {"Africa/Nairobi"}),  # Kenya: one zone
        ("+12125551234", {"America/New_York"}),  # a New York number: one zone
        ("+34612345678", {"Europe/Madrid", "Atlantic/Canary"}),  # a Spanish mobile: the peninsula or the Canaries
        ("+447911123456", {"Europe/London", "Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey"}),
        ("+15555550100", {"Asia/Tokyo"}),  # a number libphonenumber cannot place: the default
        ("not a number", {"Asia/Tokyo"}),
    ],
)
def test_the_time_zones_come_from_the_number_and_the_default_only_without_any(phone, zones):
    assert {zone.key for zone in recipient_zones(phone, "Asia/Tokyo")} == zones


def test_a_number_of_a_country_with_many_zones_may_be_in_any_of_them():
    assert len(recipient_zones("+18005551234", "Asia/Tokyo")) > 30  # US toll-free: Guam to Pago Pago
    assert ZoneInfo("Asia/Kamchatka") in recipient_zones("+79161234567", "Asia/Tokyo")  # a Russian mobile


SPAIN = "+34612345678"  # Europe/Madrid (UTC+1 in winter) or Atlantic/Canary (UTC+0)
PORTUGAL = "+351912345678"  # Europe/Lisbon (UTC+0) or Atlantic/Azores (UTC-1)
DR_CONGO = "+243812345678"  # Africa/Kinshasa (UTC+1) or Africa/Lubumbashi (UTC+2)
AUSTRALIA = "+61412345678"  # a mobile: from Indian/Cocos (UTC+6:30) to Sydney and Lord Howe (UTC+11 in January)


@pytest.mark.parametrize(
    ("phone", "now", "until"),
    [
        # 06:30 in Madrid, 05:30 in the Canaries: until 08:00 in the Canaries, 09:00 in Madrid.
        (SPAIN, utc(2030, 1, 2, 5, 30), utc(2030, 1, 2, 8, 0)),
        # 20:30 in Madrid, 19:30 in the Canaries: quiet in Madrid, so until the next morning in the Canaries.
        (SPAIN, utc(2030, 1, 1, 19, 30), utc(2030, 1, 2, 8, 0)),
        (SPAIN, utc(2030, 1, 1, 12, 0), None),  # midday in both
        # 05:10 in Lisbon, 04:10 in the Azores: until 08:00 in the Azores, 09:00 in Lisbon.
        (PORTUGAL, utc(2030, 1, 2, 5, 10), utc(2030, 1, 2, 9, 0)),
        # 06:15 in Kinshasa, 07:15 in Lubumbashi: until 08:00 in Kinshasa.
        (DR_CONGO, utc(2030, 1, 2, 5, 15), utc(2030, 1, 2, 7, 0)),
        # 19:30 in Kinshasa, 20:30 in Lubumbashi: quiet in Lubumbashi, until 08:00 in Kinshasa.
        (DR_CONGO, utc(2030, 1, 2, 18, 30), utc(2030, 1, 3, 7, 0)),
        # 22:30 in Sydney: until 08:00 in the Cocos Islands, 12:30 in Sydney (the zones' common day ends at
        # 20:00 in Sydney, 09:00 UTC).
        (AUSTRALIA, utc(2030, 1, 1, 11, 30), utc(2030, 1, 2, 1, 30)),
        (AUSTRALIA, utc(2030, 1, 2, 8, 59), None),  # 19:59 in Sydney, 15:29 in the Cocos Islands
        # US toll-free, Guam (UTC+10) to Pago Pago (UTC-11) and St John's (UTC-3:30): 22:00-23:30 UTC only.
        ("+18005551234", utc(2030, 1, 1, 10, 0), utc(2030, 1, 1, 22, 0)),
    ],
)
def test_a_message_goes_only_when_every_zone_its_number_could_be_in_is_outside_the_window(phone, now, until):
    assert quiet_until(phone, now, NIGHT, "Africa/Nairobi") == until


def test_when_no_moment_is_outside_the_window_in_every_zone_it_goes_when_most_are():
    # 09:00-08:00 leaves 08:00-09:00 local: 07:00-08:00 UTC in Madrid, 08:00-09:00 UTC in the Canaries.
    window = quiet_hours("09:00-08:00")
    assert quiet_until(SPAIN, utc(2030, 1, 1, 12, 0), window, "Africa/Nairobi") == utc(2030, 1, 2, 7, 0)
    assert quiet_until(SPAIN, utc(2030, 1, 2, 7, 30), window, "Africa/Nairobi") is None  # open in Madrid
    assert quiet_until(SPAIN, utc(2030, 1, 2, 8, 30), window, "Africa/Nairobi") is None  # open in the Canaries
    # An Australian mobile's eight zones: at 21:30 UTC three are between 08:00 and 09:00 (Adelaide, 08:00;
    # Sydney and Lord Howe, 08:30), more than at any other moment of the day.
    australia = quiet_until(AUSTRALIA, utc(2030, 1, 1, 12, 0), window, "Africa/Nairobi")
    assert australia == utc(2030, 1, 1, 21, 30)


def test_the_default_zone_serves_only_numbers_without_any(app):
    no_zone = "+15555550100"
    assert quiet_until(no_zone, utc(2030, 1, 1, 19, 0), NIGHT, "Africa/Nairobi") == utc(2030, 1, 2, 5, 0)
    assert quiet_until(no_zone, utc(2030, 1, 1, 19, 0), NIGHT, "Europe/London") is None
    assert quiet_until(SPAIN, utc(2030, 1, 2, 5, 30), NIGHT, "Europe/London") == utc(2030, 1, 2, 8, 0)


@pytest.mark.parametrize(
    ("local", "window", "ends"),
    [
        (datetime(2030, 1, 1, 20, 5), "20:00-08:00", datetime(2030, 1, 2, 8, 0)),  # evening: tomorrow
        (datetime(2030, 1, 1, 20, 0), "20:00-08:00", datetime(2030, 1, 2, 8, 0)),  # the start is inside
        (datetime(2030, 1, 1, 23, 59), "20:00-08:00", datetime(2030, 1, 2, 8, 0)),
        (datetime(2030, 1, 2, 0, 30), "20:00-08:00", datetime(2030, 1, 2, 8, 0)),  # after midnight: today
        (datetime(2030, 1, 2, 7, 59), "20:00-08:00", datetime(2030, 1, 2, 8, 0)),
        (datetime(2030, 1, 2, 8, 0), "20:00-08:00", None),  # the end is not
        (datetime(2030, 1, 2, 12, 0), "20:00-08:00", None),
        (datetime(2030, 1, 1, 19, 59), "20:00-08:00", None),
        (datetime(2030, 1, 1, 13, 15), "13:00-14:00", datetime(2030, 1, 1, 14, 0)),  # within a day
        (datetime(2030, 1, 1, 14, 0), "13:00-14:00", None),
        (datetime(2030, 1, 1, 2, 0), "13:00-14:00", None),
    ],
)
def test_the_window_ends_at_its_end_in_the_recipients_zone(local, window, ends):
    now = local.replace(tzinfo=NAIROBI).astimezone(UTC)
    expected = None if ends is None else ends.replace(tzinfo=NAIROBI).astimezone(UTC)
    assert window_end(now, NAIROBI, quiet_hours(window)) == expected


# --- the send job ---


def scheduled_refills(app, redis_conn) -> dict[str, float]:
    """The window refills waiting in RQ's schedule of the control queue: job id -> seconds from now."""
    registry = ScheduledJobRegistry(app.config["CONTROL_QUEUE"], connection=redis_conn)
    return {job_id: registry.get_scheduled_time(job_id).timestamp() - time.time() for job_id in registry.get_job_ids()}


def run_scheduled_refills(app, redis_conn, work) -> list[str]:
    """Run now the refills waiting in the control queue's schedule (as RQ's scheduler does at their time)."""
    registry = ScheduledJobRegistry(app.config["CONTROL_QUEUE"], connection=redis_conn)
    job_ids = registry.get_job_ids()
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=redis_conn)
        registry.remove(job)
        registry.get_queue().enqueue_job(job)
    work()
    return job_ids


def test_inside_the_window_nothing_is_sent_and_the_message_waits_for_its_end(
    app, client, clock, night, redis_conn, work, send_log
):
    clock.current = EVENING
    customer = make_customer(phone="+254712000001")
    campaign = make_campaign()
    send_to(client, campaign.id, [customer.id])
    work()

    assert read_send_log(send_log) == []  # no provider call
    [message] = messages(campaign.id)
    assert (message.status, message.retry_count, message.not_before) == ("pending", 0, MORNING)
    assert message.last_error is None and message.rendered_content is None
    body = detail(client, campaign.id)
    assert body["status"] == "sending"
    assert body["stats"] == expected_stats(total=1, pending=1, waiting_quiet_hours=1)
    listed = client.get(f"/campaigns/{campaign.id}/messages").get_json()["data"]
    assert listed[0]["not_before"] == "2030-01-02T05:00:00+00:00"
    # Out of its campaign's window: no job of it in Redis, one refill of the window scheduled for the end
    # (RQ counts on the real clock), which waits the whole night without expiring.
    assert Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    [(job_id, due)] = scheduled_refills(app, redis_conn).items()
    assert abs(due - (MORNING - EVENING).total_seconds()) < 60
    assert redis_conn.ttl(Job.key_for(job_id)) == -1

    clock.current = MORNING + timedelta(seconds=1)
    assert run_scheduled_refills(app, redis_conn, work) == [job_id]
    [attempt] = read_send_log(send_log)
    assert attempt["message_id"] == message.id
    [message] = messages(campaign.id)
    assert (message.status, message.retry_count, message.not_before) == ("sent", 0, MORNING)
    body = detail(client, campaign.id)
    assert body["status"] == "sent"
    assert body["stats"] == expected_stats(total=1, sent=1)


def test_outside_the_window_it_sends(app, client, clock, night, work, send_log):
    clock.current = utc(2030, 1, 1, 12, 0)  # 15:00 in Nairobi
    ids = make_customers(3)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    work()
    assert len(read_send_log(send_log)) == 3
    assert [(m.status, m.not_before) for m in messages(campaign.id)] == [("sent", None)] * 3


def test_each_recipient_is_held_by_their_own_night(app, client, clock, night, redis_conn, work, send_log):
    # 10:00 UTC: 13:00 in Nairobi, 05:00 in New York, 11:00 in Madrid and 10:00 in the Canaries.
    clock.current = utc(2030, 1, 1, 10, 0)
    kenyan = make_customer(phone="+254712000002")
    new_yorker = make_customer(phone="+12125551234")
    spaniard = make_customer(phone=SPAIN)
    toll_free = make_customer(phone="+18005551234")  # from Guam to Pago Pago: night somewhere
    nowhere = make_customer(phone="+15555550100")  # no zone at all: DEFAULT_TIMEZONE (Nairobi)
    campaign = make_campaign()
    send_to(client, campaign.id, [kenyan.id, new_yorker.id, spaniard.id, toll_free.id, nowhere.id])
    work()
    sent_to = {a["phone"] for a in read_send_log(send_log)}
    assert sent_to == {kenyan.phone, spaniard.phone, nowhere.phone}
    by_customer = {m.customer_id: m for m in messages(campaign.id)}
    assert by_customer[new_yorker.id].status == "pending"
    assert by_customer[new_yorker.id].not_before == utc(2030, 1, 1, 13, 0)  # 08:00 in New York
    assert by_customer[toll_free.id].not_before == utc(2030, 1, 1, 22, 0)  # 08:00 in Guam, 19:00 in Pago Pago

    app.config["DEFAULT_TIMEZONE"] = "America/Los_Angeles"  # 02:00 there: the number without a zone waits
    other = make_customer(phone="+15555550123")
    send_to(client, campaign.id, [other.id])
    work()
    [held] = [m for m in messages(campaign.id) if m.customer_id == other.id]
    assert (held.status, held.not_before) == ("pending", utc(2030, 1, 1, 16, 0))


def test_a_spanish_number_is_not_sent_at_dawn_in_the_canaries(app, client, clock, night, work, send_log):
    clock.current = utc(2030, 1, 2, 5, 30)  # 06:30 in Madrid, 05:30 in the Canaries; 08:30 in Nairobi
    customer = make_customer(phone=SPAIN)
    campaign = make_campaign()
    send_to(client, campaign.id, [customer.id])
    work()
    assert read_send_log(send_log) == []
    [message] = messages(campaign.id)
    assert (message.status, message.not_before) == ("pending", utc(2030, 1, 2, 8, 0))


def test_a_window_within_the_afternoon(app, client, clock, work, send_log):
    app.config.update(QUIET_HOURS=quiet_hours("13:00-14:00"), DEFAULT_TIMEZONE="Africa/Nairobi")
    clock.current = utc(2030, 1, 1, 10, 30)  # 13:30 in Nairobi
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(2))
    work()
    assert read_send_log(send_log) == []
    assert {m.not_before for m in messages(campaign.id)} == {utc(2030, 1, 1, 11, 0)}


def test_no_window_set_sends_at_night(app, client, clock, work, send_log):
    assert app.config["QUIET_HOURS"] is None  # the default: off
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(2))
    work()
    assert len(read_send_log(send_log)) == 2


def test_a_campaign_that_does_not_respect_quiet_hours_sends_at_night(app, client, clock, night, work, send_log):
    clock.current = EVENING
    created = client.post(
        "/campaigns",
        json={"name": "Code", "channel": "sms", "base_template": "Your code", "respect_quiet_hours": False},
    )
    assert created.status_code == 201
    assert created.get_json()["respect_quiet_hours"] is False
    campaign_id = created.get_json()["id"]
    send_to(client, campaign_id, make_customers(2))
    work()
    assert len(read_send_log(send_log)) == 2
    assert [(m.status, m.not_before) for m in messages(campaign_id)] == [("sent", None)] * 2


def test_the_campaign_field_defaults_to_true_and_is_edited_and_checked(client):
    created = client.post("/campaigns", json={"name": "Sale", "channel": "sms", "base_template": "Hi"}).get_json()
    assert created["respect_quiet_hours"] is True
    edited = client.patch(f"/campaigns/{created['id']}", json={"respect_quiet_hours": False})
    assert edited.status_code == 200 and edited.get_json()["respect_quiet_hours"] is False
    assert detail(client, created["id"])["respect_quiet_hours"] is False
    for bad in ("sometimes", None, 7):
        refused = client.patch(f"/campaigns/{created['id']}", json={"respect_quiet_hours": bad})
        assert refused.status_code == 422
        assert "respect_quiet_hours" in refused.get_json()["message"]
    spec = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert spec["Campaign"]["properties"]["respect_quiet_hours"]["type"] == "boolean"
    assert "not_before" in spec["Message"]["properties"]
    assert "waiting_quiet_hours" in spec["Stats"]["properties"]


def test_a_paused_campaign_holds_before_quiet_hours_are_looked_at(app, client, clock, night, work, send_log):
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(1))
    assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
    work()
    assert [(m.status, m.not_before) for m in messages(campaign.id)] == [("pending", None)]


def test_a_resume_during_the_night_leaves_waiting_messages_to_their_time(
    app, client, clock, night, redis_conn, work, send_log
):
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(2))
    work()
    assert client.post(f"/campaigns/{campaign.id}/pause").status_code == 200
    clock.advance(hours=2)  # 22:05 in Nairobi
    assert client.post(f"/campaigns/{campaign.id}/resume").status_code == 200
    # Nothing is queued for the night: no job runs only to find it still on.
    assert Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    work()
    assert read_send_log(send_log) == []
    assert {(m.status, m.retry_count, m.not_before) for m in messages(campaign.id)} == {("pending", 0, MORNING)}
    assert detail(client, campaign.id)["stats"]["waiting_quiet_hours"] == 2
    clock.current = MORNING
    assert len(run_scheduled_refills(app, redis_conn, work)) == 1
    assert len(read_send_log(send_log)) == 2


@pytest.mark.real_only
def test_a_held_message_takes_no_slot_of_the_throughput_limit(app, client, clock, night, redis_conn, work, send_log):
    """Checked before the slot: messages waiting out the night leave the limit's slots to those that go."""
    # A slot a second apart would keep its key about a second: a loaded machine's burst outlives it.
    app.config["SMS_RATE_LIMIT"] = "1 per 10 seconds"
    slots = f"{throttle.KEY_PREFIX}:*"
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(5))
    work()
    assert read_send_log(send_log) == []
    assert list(redis_conn.scan_iter(slots)) == []  # no slot was taken
    day = make_campaign(respect_quiet_hours=False)
    send_to(client, day.id, make_customers(1))
    work()
    assert len(read_send_log(send_log)) == 1
    assert list(redis_conn.scan_iter(slots)) != []  # the one that went took one


# --- surviving a flushed Redis ---


def test_after_a_redis_flush_the_reconciler_queues_waiting_messages_once_their_time_has_come(
    app, client, clock, night, redis_conn, work, send_log
):
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(2))
    work()
    assert {m.not_before for m in messages(campaign.id)} == {MORNING}
    redis_conn.flushdb()  # the scheduled refill is gone

    clock.advance(seconds=app.config["STALE_AFTER"] + 1)
    assert reconcile().refilled == 0  # untouched for long, but waiting for its time
    clock.current = MORNING - timedelta(seconds=1)
    assert reconcile().refilled == 0
    clock.current = MORNING + timedelta(seconds=1)
    assert reconcile().refilled == 2  # its time has come: into the window, whatever Redis lost
    assert reconcile().refilled == 0  # queued: not again
    work()
    assert sorted(a["message_id"] for a in read_send_log(send_log)) == sorted(m.id for m in messages(campaign.id))
    assert detail(client, campaign.id)["status"] == "sent"


def test_a_waiting_message_is_queued_once_by_whichever_refill_comes_first(
    app, client, clock, night, redis_conn, work, send_log
):
    clock.current = EVENING
    campaign = make_campaign()
    send_to(client, campaign.id, make_customers(1))
    work()
    clock.current = MORNING + timedelta(seconds=1)
    assert reconcile().refilled == 1  # the reconciler's pass came before the scheduled refill
    run_scheduled_refills(app, redis_conn, work)  # which then finds it queued already
    assert len(read_send_log(send_log)) == 1


# --- real worker processes ---


@pytest.mark.real_only
def test_a_night_campaign_runs_each_job_once_and_waits_out_of_redis(app, client, redis_conn, spawn_worker, send_log):
    """A worker process on the real clock: a window around now where the recipients are. Each job runs
    once and holds its message in the database; Redis keeps one refill of the campaign's window for the
    window's end, and nothing runs again before it."""
    local = datetime.now(NAIROBI)
    window = f"{(local - timedelta(hours=1)):%H:%M}-{(local + timedelta(hours=1)):%H:%M}"
    app.config["SEND_WINDOW"] = 50
    ids = make_customers(200)
    campaign = make_campaign()
    send_to(client, campaign.id, ids)
    worker = spawn_worker(QUIET_HOURS=window, DEFAULT_TIMEZONE="Africa/Nairobi", SEND_WINDOW=50)
    assert worker.wait(timeout=120) == 0, worker.stderr.read().decode()[-2000:]

    assert read_send_log(send_log) == []
    held = messages(campaign.id)
    assert len(held) == 200 and {(m.status, m.retry_count, m.job_seq) for m in held} == {("pending", 0, 1)}
    ends = {m.not_before for m in held}
    assert len(ends) == 1
    [end] = ends
    assert timedelta(minutes=58) < end - datetime.now(UTC) <= timedelta(hours=1)
    assert Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    assert ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn).count == 0
    [(_, due)] = scheduled_refills(app, redis_conn).items()
    assert timedelta(minutes=58).total_seconds() < due <= timedelta(hours=1).total_seconds()
    assert detail(client, campaign.id)["stats"]["waiting_quiet_hours"] == 200

    # A second worker finds nothing to run before the window's end.
    again = spawn_worker(QUIET_HOURS=window, DEFAULT_TIMEZONE="Africa/Nairobi", SEND_WINDOW=50)
    assert again.wait(timeout=60) == 0
    assert read_send_log(send_log) == []
    assert {m.job_seq for m in messages(campaign.id)} == {1}
