"""Throughput limits per provider account (`SMS_RATE_LIMIT`, `WHATSAPP_RATE_LIMIT`): measured as a provider
measures them, by the times requests arrive, against real Redis, real worker processes and the fake
providers. A limit of N per second means no window of one second holds more than N."""

from __future__ import annotations

import bisect
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from flask import Flask
from redis import Redis
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from app.extensions import db
from app.messaging.send import throttle
from app.messaging.send.window import message_job_id
from app.models import Customer, OutboundMessage
from tests.conftest import TEST_REDIS_URL, wait_for
from tests.factories import make_campaign, make_customer, make_customers
from tests.test_providers import run_postponed


def most_in_a_window(times: list[float], period: float = 1.0) -> int:
    """The largest number of `times` in any window [t, t + period): the count a provider would see."""
    times = sorted(times)
    return max((bisect.bisect_left(times, start + period) - i for i, start in enumerate(times)), default=0)


def limiter_app(redis: Redis | object, **settings) -> Flask:
    """A bare app holding what the limiter reads: the settings and the Redis connection."""
    app = Flask("throttle-test")
    defaults = {
        "SMS_PROVIDER": "mock",
        "WHATSAPP_PROVIDER": "mock",
        "SMS_RATE_LIMIT": None,
        "WHATSAPP_RATE_LIMIT": None,
    }
    app.config.update({**defaults, **settings})
    app.extensions["redis"] = redis
    return app


@pytest.fixture
def limiter_redis():
    """The real test Redis (the limiter's script needs Lua, which fakeredis lacks), without limiter keys."""
    redis = Redis.from_url(TEST_REDIS_URL)
    for key in redis.scan_iter(f"{throttle.KEY_PREFIX}:*"):
        redis.delete(key)
    yield redis
    redis.close()


def send_for(limit: str, seconds: float, threads: int) -> list[tuple[float, float]]:
    """In one process: `threads` senders taking slots of `limit` for `seconds`, as send jobs do (waiting for
    the slot, or, handed back, trying again a little later). Returns each send's (slot time on Redis's
    clock, time.time() when it went)."""
    app = limiter_app(Redis.from_url(TEST_REDIS_URL), SMS_RATE_LIMIT=limit)
    sent: list[tuple[float, float]] = []
    end = time.time() + seconds

    def sender() -> None:
        while time.time() < end:
            asked = time.monotonic()
            slot = throttle.take_slot(app, "sms")
            if not slot.granted:
                time.sleep(0.05)  # handed back: a job comes back later
                continue
            time.sleep(max(0.0, slot.wait))
            if time.monotonic() > asked + slot.wait + throttle.LATE:
                continue  # held up past its slot: a send takes a new one (providers.http.post)
            sent.append((slot.at, time.time()))

    workers = [threading.Thread(target=sender) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sent


def test_senders_in_several_processes_never_exceed_the_limit_in_any_second_and_get_most_of_it(limiter_redis):
    processes, threads, seconds = 4, 8, 4.0
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(send_for, ["100/second"] * processes, [seconds] * processes, [threads] * processes))
    slots = [at for run in runs for at, _ in run]
    went = [at for run in runs for _, at in run]
    assert all(runs), "every process sent"
    assert most_in_a_window(slots) <= 98  # slots 10.3 ms apart: 100 span 1.03 s
    assert most_in_a_window(went) <= 100  # as the provider would count them, jitter included
    rate = (len(went) - 1) / (max(went) - min(went))
    assert rate >= 80, rate  # most of the limit (97/s at best; bench/delivery.py measures it)


def test_the_spacing_keeps_every_limit_given_with_room_for_jitter():
    assert throttle.spacing("100/second") == pytest.approx(0.0103)
    assert throttle.spacing("100 per 2 seconds") == pytest.approx(0.0203)
    assert throttle.spacing("6000/minute") == pytest.approx(0.010005)  # 30 ms of jitter is 0.05 % of a minute
    assert throttle.spacing("10/second;30/minute") == pytest.approx(2.001)  # the minute's is the stricter


def test_a_slot_further_than_max_wait_is_not_reserved_and_hand_backs_are_spread(limiter_redis):
    app = limiter_app(limiter_redis, SMS_RATE_LIMIT="1/second")  # slots 1.03 s apart: beyond MAX_WAIT
    first = throttle.take_slot(app, "sms")
    assert (first.granted, first.wait) == (True, 0.0)
    handed_back = [throttle.take_slot(app, "sms") for _ in range(3)]
    assert [slot.granted for slot in handed_back] == [False] * 3
    # Each gets a later turn, one spacing apart, so that handed-back jobs do not all come back at once.
    assert [round(slot.at - first.at, 2) for slot in handed_back] == [1.03, 2.06, 3.09]
    time.sleep(0.1)  # the next slot is now within MAX_WAIT
    second = throttle.take_slot(app, "sms")
    # The hand-backs reserved nothing: the next slot is the one right after the first.
    assert second.granted and round(second.at - first.at, 3) == 1.03


def test_each_account_has_its_own_limit_and_no_secret_in_its_key(limiter_redis):
    settings = {
        "SMS_RATE_LIMIT": "1/second",
        "WHATSAPP_RATE_LIMIT": "1/second",
        "SMS_PROVIDER": "twilio",
        "TWILIO_ACCOUNT_SID": "AC123",
        "TWILIO_AUTH_TOKEN": "twilio-secret",
        "TWILIO_FROM": "+15005550006",
        "TWILIO_MESSAGING_SERVICE_SID": None,
        "WHATSAPP_PROVIDER": "whatsapp_cloud",
        "WHATSAPP_PHONE_NUMBER_ID": "106540352242922",
        "WHATSAPP_ACCESS_TOKEN": "meta-secret",
    }
    one = limiter_app(limiter_redis, **settings)
    other = limiter_app(limiter_redis, **{**settings, "TWILIO_FROM": "+15005550007"})
    assert throttle.take_slot(one, "sms").granted
    assert throttle.take_slot(one, "whatsapp").granted  # another account, another limit
    assert throttle.take_slot(other, "sms").granted  # another sender of the account
    assert not throttle.take_slot(one, "sms").granted
    keys = sorted(key.decode() for key in limiter_redis.keys(f"{throttle.KEY_PREFIX}:*"))
    assert keys == [
        f"{throttle.KEY_PREFIX}:twilio:AC123:+15005550006",
        f"{throttle.KEY_PREFIX}:twilio:AC123:+15005550007",
        f"{throttle.KEY_PREFIX}:whatsapp_cloud:106540352242922",
    ]
    assert all(0 < limiter_redis.pttl(key) <= 4200 for key in keys)  # an idle account's key vanishes


class NoRedis:
    """Any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"Redis was called ({name}) with no limit set")


def test_without_a_limit_the_limiter_calls_no_redis():
    app = limiter_app(NoRedis())
    assert throttle.wait_for_slot(app, "sms") is None
    assert throttle.wait_for_slot(app, "whatsapp") is None


def test_when_redis_fails_nothing_is_sent_and_the_job_is_tried_again_later():
    app = limiter_app(Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5), SMS_RATE_LIMIT="5/second")
    assert throttle.wait_for_slot(app, "sms") == throttle.REDIS_FAILURE_DELAY


@pytest.mark.real_only
def test_a_message_whose_slot_is_near_waits_for_it_and_is_sent_in_the_same_run(
    app, client, use_provider, fake_providers, work
):
    use_provider("twilio", SMS_RATE_LIMIT="2/second")  # slots 0.515 s apart
    taken = throttle.take_slot(app, "sms")  # another worker just sent
    customer = make_customer()
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]}).status_code == 202
    work()
    [request] = fake_providers.requests("twilio")
    assert request.received_at >= taken.at + 0.5
    row = db.session.scalars(db.select(OutboundMessage)).one()
    assert (row.status, row.retry_count) == ("sent", 0)


@pytest.mark.real_only
def test_a_message_with_no_slot_soon_is_handed_back_untouched_and_sent_later_without_using_a_retry(
    app, client, use_provider, fake_providers, work, redis_conn
):
    use_provider("twilio", SMS_RATE_LIMIT="1 per 2 seconds")
    customer = make_customer()
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]}).status_code == 202
    row = db.session.scalars(db.select(OutboundMessage)).one()
    before = (row.status, row.retry_count, row.last_error, row.error_class, row.job_seq)
    taken = time.time()
    throttle.take_slot(app, "sms")  # another worker just sent: the next slot is 2.03 s away, beyond MAX_WAIT
    work()
    assert fake_providers.requests("twilio") == []
    db.session.refresh(row)
    # Claimed, then given back to the same job: queued as it was, no retry used, no error.
    assert (row.status, row.retry_count, row.last_error, row.error_class, row.job_seq) == before
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    job_id = message_job_id(row.id, row.job_seq)
    due = registry.get_scheduled_time(job_id).timestamp()
    # Its turn (about the slot 2 s after the one taken), in whole seconds as RQ schedules: however long the burst
    # took on a loaded machine.
    assert taken + 1 <= due <= taken + 3.5
    assert Job.fetch(job_id, connection=redis_conn).retries_left == 3  # none used
    time.sleep(max(0.0, due - time.time()))
    assert run_postponed(app, redis_conn, work) == [job_id]
    assert len(fake_providers.requests("twilio")) == 1
    db.session.refresh(row)
    assert (row.status, row.retry_count, row.last_error) == ("sent", 0, None)


@pytest.mark.real_only
def test_each_channel_has_its_own_limit(app, client, use_provider, fake_providers, work):
    use_provider("twilio")
    use_provider("whatsapp_cloud", WHATSAPP_RATE_LIMIT="1 per 2 seconds")  # SMS stays unlimited
    throttle.take_slot(app, "whatsapp")  # the next WhatsApp slot is 2.03 s away
    customer = make_customer()
    for channel in ("sms", "whatsapp"):
        campaign = make_campaign(channel=channel, base_template="Hi")
        assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]}).status_code == 202
    work()
    assert (len(fake_providers.requests("twilio")), len(fake_providers.requests("whatsapp"))) == (1, 0)
    statuses = db.session.execute(db.select(OutboundMessage.status).order_by(OutboundMessage.id)).scalars().all()
    assert statuses == ["sent", "queued"]


@pytest.mark.real_only
def test_two_worker_processes_never_exceed_the_limit_at_the_provider_and_send_each_message_once(
    app, client, fake_providers, live_server, spawn_worker
):
    count, limit = 60, 20
    ids = make_customers(count)
    campaign = make_campaign(base_template="Hi {first_name}")
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": ids}).status_code == 202
    provider = {
        "SMS_PROVIDER": "twilio",
        "SMS_RATE_LIMIT": f"{limit}/second",
        "PUBLIC_BASE_URL": live_server,
        "TWILIO_ACCOUNT_SID": fake_providers.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": fake_providers.twilio_auth_token,
        "TWILIO_FROM": fake_providers.twilio_service_from,
        "TWILIO_BASE_URL": fake_providers.base_url,
    }
    # Long-running workers, as in production: with their threads (WORKER_CONCURRENCY) far more sends are
    # ready than the limit has slots for within a second, and those are handed back to come again later.
    workers = [spawn_worker(burst=False, **provider) for _ in range(2)]
    wait_for(lambda: client.get(f"/campaigns/{campaign.id}").get_json()["status"] == "sent", timeout=60)
    for worker in workers:
        assert worker.poll() is None, worker.stderr.read().decode()[-3000:]
    requests = fake_providers.requests("twilio")
    arrivals = [r.received_at for r in requests]
    assert most_in_a_window(arrivals) <= limit
    phones = db.session.scalars(db.select(Customer.phone).where(Customer.id.in_(ids))).all()
    assert sorted(r.params["To"] for r in requests) == sorted(phones)  # each message once
    # Not starved: every message went within the deadline above. How close to the limit the pace comes depends on
    # the machine's load, so bench/delivery.py measures it, not this test.
    rows = db.session.execute(db.select(OutboundMessage.status, OutboundMessage.retry_count)).all()
    assert sorted(set(map(tuple, rows))) == [("sent", 0)] and len(rows) == count


@pytest.mark.real_only
def test_a_send_held_up_past_its_slot_makes_no_request_and_is_handed_back_untouched(
    app, client, use_provider, fake_providers, work, redis_conn, monkeypatch
):
    use_provider("twilio", SMS_RATE_LIMIT="100/second")
    monkeypatch.setattr(throttle, "LATE", -1.0)  # every send is late for its slot, as on a stalled CPU
    customer = make_customer()
    campaign = make_campaign()
    assert client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [customer.id]}).status_code == 202
    work()
    assert fake_providers.requests("twilio") == []  # no request left late
    row = db.session.scalars(db.select(OutboundMessage)).one()
    assert (row.status, row.retry_count, row.last_error) == ("queued", 0, None)
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    assert message_job_id(row.id, row.job_seq) in registry.get_job_ids()  # handed back for later
    assert Job.fetch(message_job_id(row.id, row.job_seq), connection=redis_conn).retries_left == 3  # none used
