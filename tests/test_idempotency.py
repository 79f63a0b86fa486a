"""Idempotency-Key on POST /customers, POST /campaigns and POST /campaigns/{id}/send."""

import threading
import time
from datetime import timedelta

import pytest

from app import clock as app_clock
from app.auth import hash_key
from app.campaigns import service as campaign_service
from app.customers import service as customer_service
from app.extensions import db
from app.idempotency import request_fingerprint
from app.messaging.triggers import get_scheduler, register_periodic_jobs
from app.models import Campaign, Customer, IdempotencyKey, OutboundMessage
from tests.conftest import TEST_API_KEY
from tests.factories import make_campaign, make_customers

CAMPAIGN = {"name": "Launch", "channel": "sms", "base_template": "Hi {first_name}"}
OWNER = f"env:{hash_key(TEST_API_KEY)[:16]}"


def count(model) -> int:
    db.session.rollback()  # see what the requests committed
    return db.session.scalar(db.select(db.func.count()).select_from(model))


def post(client, path, body, key="key-1", **headers):
    return client.post(path, json=body, headers={"Idempotency-Key": key, **headers})


def test_repeat_replays_the_first_answer_and_creates_nothing(client):
    first = post(client, "/customers", {"phone": "0712345678", "first_name": "Amina"})
    again = post(client, "/customers", {"phone": "0712345678", "first_name": "Amina"})
    assert first.status_code == again.status_code == 201
    assert again.get_json() == first.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count(Customer) == 1


def test_same_body_in_another_key_order_or_layout_is_a_repeat(client):
    post(client, "/campaigns", CAMPAIGN)
    again = client.post(
        "/campaigns",
        data='{ "base_template": "Hi {first_name}",\n "channel": "sms", "name": "Launch" }',
        content_type="application/json",
        headers={"Idempotency-Key": "key-1"},
    )
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert count(Campaign) == 1


def test_same_key_with_another_body_is_409_and_does_nothing(client):
    post(client, "/campaigns", CAMPAIGN)
    response = post(client, "/campaigns", {**CAMPAIGN, "name": "Other"})
    assert response.status_code == 409
    assert "Idempotency-Key" in response.get_json()["message"]
    assert count(Campaign) == 1


def test_same_key_on_another_endpoint_is_409(client):
    post(client, "/campaigns", CAMPAIGN)
    response = post(client, "/customers", {"phone": "0712345678"})
    assert response.status_code == 409
    assert count(Customer) == 0


def test_keys_belong_to_one_api_key(client, app):
    app.config["API_KEYS"] = [TEST_API_KEY, "other-key"]
    post(client, "/campaigns", CAMPAIGN)
    other = post(client, "/campaigns", CAMPAIGN, Authorization="Bearer other-key")
    assert other.status_code == 201 and "Idempotent-Replayed" not in other.headers
    assert count(Campaign) == 2


def test_requests_without_a_key_are_not_deduplicated(client):
    client.post("/campaigns", json=CAMPAIGN)
    client.post("/campaigns", json=CAMPAIGN)
    assert count(Campaign) == 2
    assert count(IdempotencyKey) == 0


def test_repeat_send_replays_and_enqueues_nothing_more(client, redis_conn, send_queue):
    ids = make_customers(3)
    campaign_id = make_campaign().id
    first = post(client, f"/campaigns/{campaign_id}/send", {"customer_ids": ids})
    jobs = sorted(send_queue.job_ids)
    redis_conn.delete(send_queue.key)
    again = post(client, f"/campaigns/{campaign_id}/send", {"customer_ids": ids})
    assert first.status_code == again.status_code == 202
    assert (
        again.get_json()
        == first.get_json()
        == {
            "campaign_id": campaign_id,
            "messages_queued": 3,
            "messages_left_for_reconciler": 0,
            "skipped_opted_out": 0,
            "skipped_frequency_cap": 0,
            "adding_recipients": False,
            "status": "sending",
        }
    )
    assert len(jobs) == 3 and send_queue.job_ids == []
    assert count(OutboundMessage) == 3


def test_error_answers_are_replayed_too(client):
    first = post(client, "/customers", {"phone": "12345"})
    again = post(client, "/customers", {"phone": "12345"})
    assert first.status_code == again.status_code == 422
    assert again.get_json() == first.get_json() and again.headers["Idempotent-Replayed"] == "true"


def test_server_error_is_not_kept_so_a_retry_runs(client, monkeypatch):
    create = customer_service.create_customer
    calls = []

    def fail_once(data):
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return create(data)

    monkeypatch.setattr(customer_service, "create_customer", fail_once)
    failed = post(client, "/customers", {"phone": "0712345678"})
    assert failed.status_code == 500
    assert "database went away" not in failed.get_data(as_text=True)
    retried = post(client, "/customers", {"phone": "0712345678"})
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert len(calls) == 2 and count(Customer) == 1


@pytest.mark.parametrize("key", ["", "x" * 256])
def test_empty_or_overlong_key_is_422(client, key):
    response = post(client, "/campaigns", CAMPAIGN, key=key)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.get_json()["message"]
    assert count(Campaign) == 0


def test_key_older_than_24_hours_is_forgotten(client, clock):
    post(client, "/campaigns", CAMPAIGN)
    clock.advance(hours=23, minutes=59)
    assert post(client, "/campaigns", CAMPAIGN).headers.get("Idempotent-Replayed") == "true"
    clock.advance(minutes=2)
    again = post(client, "/campaigns", CAMPAIGN)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert count(Campaign) == 2


def test_expired_keys_are_deleted_by_their_own_periodic_job(app, client, clock, work):
    """The purge is a periodic job of its own, registered by the scheduler beside the reconciler."""
    post(client, "/campaigns", CAMPAIGN, key="old")
    clock.advance(hours=20)
    post(client, "/campaigns", CAMPAIGN, key="recent")
    clock.advance(hours=5)
    scheduler = get_scheduler()
    register_periodic_jobs(scheduler)
    [purge] = [job for job in scheduler.get_jobs() if job.func_name == "app.idempotency.purge_expired"]
    assert purge.meta["interval"] == app.config["IDEMPOTENCY_PURGE_INTERVAL"]
    scheduler.enqueue_job(purge)  # what rq-scheduler does when it is due
    work()
    assert db.session.scalars(db.select(IdempotencyKey.key)).all() == ["recent"]


def _in_progress(app, key: str, age: timedelta) -> None:
    """The row a first POST /campaigns of CAMPAIGN leaves while it runs (or after it died), `age` ago."""
    with app.test_request_context("/campaigns", method="POST", json=CAMPAIGN):
        request_hash = request_fingerprint()
    db.session.add(IdempotencyKey(owner=OWNER, key=key, request_hash=request_hash, created_at=app_clock.now() - age))
    db.session.commit()


def test_repeat_while_the_first_is_in_progress_waits_then_is_409(client, app):
    app.config["IDEMPOTENCY_WAIT"] = 0.3
    _in_progress(app, "busy", timedelta(seconds=1))
    started = time.monotonic()
    response = post(client, "/campaigns", CAMPAIGN, key="busy")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 409
    assert "in progress" in response.get_json()["message"]
    assert count(Campaign) == 0


def test_key_of_a_request_that_died_is_taken_over(client, app):
    _in_progress(app, "orphan", timedelta(seconds=app.config["IDEMPOTENCY_ABANDON_AFTER"] + 1))
    response = post(client, "/campaigns", CAMPAIGN, key="orphan")
    assert response.status_code == 201
    assert post(client, "/campaigns", CAMPAIGN, key="orphan").headers["Idempotent-Replayed"] == "true"
    assert count(Campaign) == 1


def test_concurrent_repeats_do_the_work_once(app, client, monkeypatch):
    create = campaign_service.create_campaign
    calls = []

    def slow_create(data):
        calls.append(data)
        time.sleep(0.5)  # hold the key while the repeats arrive
        return create(data)

    monkeypatch.setattr(campaign_service, "create_campaign", slow_create)
    barrier = threading.Barrier(6)
    responses = []

    def repeat():
        barrier.wait()
        responses.append(post(client, "/campaigns", CAMPAIGN, key="burst"))

    threads = [threading.Thread(target=repeat) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert {r.status_code for r in responses} == {201}
    assert len({r.get_data() for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 5
    assert count(Campaign) == 1


def test_openapi_documents_the_header_on_the_four_posts(client):
    spec = client.get("/openapi.json").get_json()
    with_header = {
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method != "parameters" and any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    }
    assert with_header == {
        "POST /customers",
        "POST /campaigns",
        "POST /campaigns/{campaign_id}/send",
        "POST /campaigns/{campaign_id}/retry-failed",
    }
    for operation in with_header:
        method, path = operation.split()
        assert "409" in spec["paths"][path][method.lower()]["responses"]
