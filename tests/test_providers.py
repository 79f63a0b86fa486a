"""Real providers, end to end against a local fake of each (a real HTTP server speaking its shapes): the
send job's requests, every failure class, and delivery receipts posted back, signed, to the served app."""

from __future__ import annotations

import time

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from app.extensions import db
from app.messaging.providers.africastalking import receipt_from_form as africastalking_receipt
from app.messaging.providers.twilio import receipt_from_form as twilio_receipt
from app.messaging.providers.whatsapp_cloud import receipt_from_status as whatsapp_receipt
from app.messaging.reconcile import reconcile
from app.messaging.send.window import message_job_id
from app.models import DeliveryReceipt, OutboundMessage
from tests.factories import make_campaign, make_customer
from tests.fake_providers import accept, hang, refuse, server_error, throttle
from tests.helpers import stats

# The fake's name for each provider of the service.
FAKE = {"africastalking": "africastalking", "twilio": "twilio", "whatsapp_cloud": "whatsapp"}
CHANNEL = {"africastalking": "sms", "twilio": "sms", "whatsapp_cloud": "whatsapp"}


def send(client, campaign_id: int, customer_ids: list[int]) -> None:
    response = client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": customer_ids})
    assert response.status_code == 202, response.get_json()


def messages(client, campaign_id: int) -> list[dict]:
    body = client.get(f"/campaigns/{campaign_id}/messages", query_string={"page_size": 100}).get_json()
    return sorted(body["data"], key=lambda m: m["id"])


def detail(client, campaign_id: int) -> dict:
    return client.get(f"/campaigns/{campaign_id}").get_json()


def run_postponed(app, redis_conn, work) -> list[str]:
    """Run now the send jobs waiting in RQ's schedule (as RQ's scheduler does when their time comes)."""
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    job_ids = registry.get_job_ids()
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=redis_conn)
        registry.remove(job)
        registry.get_queue().enqueue_job(job)
    work()
    return job_ids


def one_message(app, provider: str, **campaign) -> tuple:
    """A customer and a campaign on `provider`'s channel: `(customer, campaign)`."""
    customer = make_customer(first_name="Amina", preferred_product="Sneakers")
    return customer, make_campaign(channel=CHANNEL[provider], base_template="Hi {first_name}", **campaign)


def test_africas_talking_takes_the_message_and_its_delivery_report_is_applied(
    app, client, use_provider, fake_providers, work
):
    use_provider("africastalking", AFRICASTALKING_SENDER_ID="ACME")
    customer, campaign = one_message(app, "africastalking")
    send(client, campaign.id, [customer.id])
    work()
    [request] = fake_providers.requests("africastalking")
    assert request.path == "/version1/messaging"
    assert request.params == {"username": "sandbox", "to": customer.phone, "message": "Hi Amina", "from": "ACME"}
    assert request.headers["apikey"] == fake_providers.at_api_key
    assert request.headers["accept"] == "application/json"
    [row] = messages(client, campaign.id)
    assert (row["status"], row["provider"], row["provider_message_id"]) == (
        "sent",
        "africastalking",
        request.message_id,
    )
    assert detail(client, campaign.id)["status"] == "sent"

    answer = fake_providers.send_receipt("africastalking", request.message_id, "Success")
    assert (answer.status, answer.json()["applied"]) == (200, 1)
    assert messages(client, campaign.id)[0]["status"] == "delivered"
    assert detail(client, campaign.id)["stats"] == stats(total=1, delivered=1)


def test_twilio_takes_the_message_with_its_status_callback_and_receipts_move_it(
    app, client, use_provider, fake_providers, work, live_server
):
    use_provider("twilio")
    first, campaign = one_message(app, "twilio")
    second = make_customer()
    send(client, campaign.id, [first.id, second.id])
    work()
    requests = {r.params["To"]: r for r in fake_providers.requests("twilio")}
    request = requests[first.phone]
    assert request.path == f"/2010-04-01/Accounts/{fake_providers.twilio_account_sid}/Messages.json"
    assert request.params == {
        "To": first.phone,
        "From": fake_providers.twilio_service_from,
        "Body": "Hi Amina",
        "StatusCallback": f"{live_server}/webhooks/twilio/status",
    }
    assert request.headers["authorization"].startswith("Basic ")
    rows = {m["customer_id"]: m for m in messages(client, campaign.id)}
    assert rows[first.id]["provider_message_id"] == request.message_id
    assert request.message_id.startswith("SM")

    assert fake_providers.send_receipt("twilio", request.message_id, "delivered").status == 200
    undelivered = requests[second.phone].message_id
    assert fake_providers.send_receipt("twilio", undelivered, "undelivered", error_code=30003).status == 200
    rows = {m["customer_id"]: m for m in messages(client, campaign.id)}
    assert rows[first.id]["status"] == "delivered"
    assert (rows[second.id]["status"], rows[second.id]["error_code"]) == ("undelivered", "30003")
    assert detail(client, campaign.id)["stats"] == stats(total=2, delivered=1, undelivered=1)


def test_whatsapp_template_gets_one_body_parameter_per_placeholder_in_order(
    app, client, use_provider, fake_providers, work
):
    use_provider("whatsapp_cloud")
    customer = make_customer(first_name="Amina", preferred_product=None, location="Nairobi")
    campaign = make_campaign(
        channel="whatsapp",
        base_template="Hi {first_name}, {preferred_product} in {location}. Bye {first_name}",
        whatsapp_template={"name": "spring_promo", "language": "en_US"},
    )
    send(client, campaign.id, [customer.id])
    work()
    [request] = fake_providers.requests("whatsapp")
    assert request.path == f"/v21.0/{fake_providers.whatsapp_phone_number_id}/messages"
    assert request.headers["authorization"] == f"Bearer {fake_providers.whatsapp_access_token}"
    assert request.params == {
        "messaging_product": "whatsapp",
        "to": customer.phone.removeprefix("+"),
        "type": "template",
        "template": {
            "name": "spring_promo",
            "language": {"code": "en_US"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": value} for value in ("Amina", "[unknown]", "Nairobi", "Amina")
                    ],
                }
            ],
        },
    }
    assert messages(client, campaign.id)[0]["provider_message_id"] == request.message_id


def test_whatsapp_without_a_template_sends_text(app, client, use_provider, fake_providers, work):
    use_provider("whatsapp_cloud")
    customer, campaign = one_message(app, "whatsapp_cloud")
    send(client, campaign.id, [customer.id])
    work()
    [request] = fake_providers.requests("whatsapp")
    assert request.params["type"] == "text" and request.params["text"] == {"body": "Hi Amina"}


# provider -> (a permanent refusal, an account refusal), in the provider's own codes
REFUSALS = {
    "africastalking": (refuse(403), "403", refuse(405), "405"),
    "twilio": (refuse(21211), "21211", refuse(20003), "20003"),
    "whatsapp_cloud": (refuse(131047), "131047", refuse(190), "190"),
}


@pytest.mark.parametrize("provider", list(FAKE))
def test_a_permanent_refusal_fails_the_message_at_once_without_a_retry(
    app, client, use_provider, fake_providers, work, provider
):
    use_provider(provider)
    customer, campaign = one_message(app, provider)
    outcome, code, _, _ = REFUSALS[provider]
    fake_providers.script(FAKE[provider], customer.phone, outcome)
    send(client, campaign.id, [customer.id])
    work()
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"], row["error_class"], row["error_code"]) == (
        "failed",
        0,
        "permanent",
        code,
    )
    assert row["provider_message_id"] is None
    assert len(fake_providers.requests(FAKE[provider])) == 1
    assert detail(client, campaign.id)["status"] == "failed"


@pytest.mark.parametrize("provider", list(FAKE))
def test_a_transient_failure_is_retried_and_then_sent(app, client, use_provider, fake_providers, work, provider):
    use_provider(provider)
    customer, campaign = one_message(app, provider)
    fake_providers.script(FAKE[provider], customer.phone, server_error(503), accept())
    send(client, campaign.id, [customer.id])
    work()
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"], row["error_class"]) == ("sent", 1, "transient")
    assert len(fake_providers.requests(FAKE[provider])) == 2


@pytest.mark.parametrize("provider", list(FAKE))
def test_a_throttled_attempt_waits_and_uses_no_retry(
    app, client, use_provider, fake_providers, work, redis_conn, provider
):
    use_provider(provider)
    customer, campaign = one_message(app, provider)
    fake_providers.script(FAKE[provider], customer.phone, throttle(retry_after=7), accept())
    send(client, campaign.id, [customer.id])
    work()
    [row] = messages(client, campaign.id)
    # Still in its campaign's window, its job postponed: no retry used.
    assert (row["status"], row["retry_count"], row["error_class"]) == ("queued", 0, "throttled")
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    waits = registry.get_scheduled_time(message_job_id(row["id"], 1)).timestamp() - time.time()
    assert 4 <= waits <= 8  # the provider's Retry-After
    assert run_postponed(app, redis_conn, work) == [message_job_id(row["id"], 1)]
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"]) == ("sent", 0)


@pytest.mark.parametrize("provider", list(FAKE))
def test_an_account_refusal_pauses_the_campaign_and_burns_no_retry(
    app, client, use_provider, fake_providers, work, redis_conn, provider
):
    use_provider(provider)
    customer, campaign = one_message(app, provider)
    others = [make_customer().id for _ in range(3)]
    _, _, outcome, code = REFUSALS[provider]
    fake_providers.script(FAKE[provider], customer.phone, outcome, accept())
    send(client, campaign.id, [customer.id, *others])
    work()

    paused = detail(client, campaign.id)
    assert paused["status"] == "paused"
    rows = messages(client, campaign.id)
    assert paused["status_reason"] == f"paused: the provider refused the account: {rows[0]['last_error']}"
    assert (rows[0]["status"], rows[0]["retry_count"]) == ("pending", 0)
    assert (rows[0]["error_class"], rows[0]["error_code"]) == ("account", code)
    # Nothing burned into failed: the others are pending (their jobs found the campaign paused), or sent
    # when the worker's threads had them in flight already, as when a campaign is paused.
    assert {(r["status"], r["retry_count"]) for r in rows[1:]} <= {("pending", 0), ("sent", 0)}
    already_sent = sum(r["status"] == "sent" for r in rows)
    assert len(fake_providers.requests(FAKE[provider])) == 1 + already_sent
    registry = ScheduledJobRegistry(app.config["SEND_QUEUE"], connection=redis_conn)
    assert registry.count == 0 and Queue(app.config["SEND_QUEUE"], connection=redis_conn).count == 0  # no retry

    # Fixed (the fake now accepts): resume sends each message once.
    resumed = client.post(f"/campaigns/{campaign.id}/resume")
    assert (resumed.status_code, resumed.get_json()["status"], resumed.get_json()["status_reason"]) == (
        200,
        "sending",
        None,
    )
    work()
    assert detail(client, campaign.id)["status"] == "sent"
    assert [(r["status"], r["retry_count"]) for r in messages(client, campaign.id)] == [("sent", 0)] * 4
    assert len(fake_providers.requests(FAKE[provider])) == 5  # each message taken once, the refused one twice


def test_retry_failed_sends_again_the_transient_failures_only(app, client, use_provider, fake_providers, work):
    use_provider("twilio")
    campaign = make_campaign(channel="sms", base_template="Hi {first_name}")
    invalid, flaky, off, unknown, fine = (make_customer() for _ in range(5))
    fake_providers.script("twilio", invalid.phone, refuse(21211))  # permanent at send time
    fake_providers.script("twilio", flaky.phone, *[server_error(503)] * 4, accept())  # fails its 4 attempts
    send(client, campaign.id, [c.id for c in (invalid, flaky, off, unknown, fine)])
    work()
    by_customer = {r["customer_id"]: r for r in messages(client, campaign.id)}
    old_sid = by_customer[off.id]["provider_message_id"]
    fake_providers.send_receipt("twilio", old_sid, "undelivered", error_code=30003)  # handset off: transient
    fake_providers.send_receipt(
        "twilio", by_customer[unknown.id]["provider_message_id"], "undelivered", error_code=30005
    )
    fake_providers.send_receipt("twilio", by_customer[fine.id]["provider_message_id"], "delivered")
    before = detail(client, campaign.id)
    assert before["status"] == "sent"
    assert before["stats"] == stats(total=5, failed=2, undelivered=2, delivered=1)
    by_customer = {r["customer_id"]: r for r in messages(client, campaign.id)}
    assert by_customer[off.id]["error_class"] == "transient" and by_customer[unknown.id]["error_class"] == "permanent"

    key = {"Idempotency-Key": "retry-1"}
    answer = client.post(f"/campaigns/{campaign.id}/retry-failed", headers=key)
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert (body["requeued"], body["not_retryable"]) == (2, 2)
    assert (body["campaign"]["status"], body["campaign"]["stats"]) == (
        "sending",
        stats(total=5, queued=2, failed=1, undelivered=1, delivered=1),
    )
    again = client.post(f"/campaigns/{campaign.id}/retry-failed", headers=key)
    assert again.get_json() == body and again.headers["Idempotent-Replayed"] == "true"
    work()

    by_customer = {r["customer_id"]: r for r in messages(client, campaign.id)}
    assert [by_customer[c.id]["status"] for c in (invalid, flaky, off, unknown, fine)] == [
        "failed",
        "sent",
        "sent",
        "undelivered",
        "delivered",
    ]
    assert (by_customer[flaky.id]["retry_count"], by_customer[off.id]["retry_count"]) == (0, 0)
    new_sid = by_customer[off.id]["provider_message_id"]
    assert new_sid and new_sid != old_sid  # the old provider id is replaced
    late = fake_providers.send_receipt("twilio", old_sid, "failed", error_code=30008)  # a late one for the old id
    assert late.json() == {"applied": 0, "unchanged": 0, "kept": 1, "ignored": 0, "invalid": 0, "deferred": 0}
    assert detail(client, campaign.id)["status"] == "sent"
    # Nothing transient is left: a new retry requeues nothing and leaves the campaign as it is.
    assert client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()["requeued"] == 0
    assert detail(client, campaign.id)["status"] == "sent"


@pytest.mark.parametrize(
    ("parse", "permanent", "transient"),
    [
        (
            lambda code: africastalking_receipt({"id": "ATX", "status": "Failed", "failureReason": code}),
            "UserInBlackList",
            "AbsentSubscriber",
        ),
        (
            lambda code: twilio_receipt({"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": code}),
            "30005",
            "30003",
        ),
        (
            lambda code: whatsapp_receipt({"id": "w", "status": "failed", "errors": [{"code": int(code)}]}),
            "131026",
            "131049",
        ),
    ],
    ids=["africastalking", "twilio", "whatsapp_cloud"],
)
def test_a_failure_receipt_is_classed_from_the_providers_code(parse, permanent, transient):
    assert parse(permanent).error_class == "permanent"
    assert parse(transient).error_class == "transient"


def test_a_provider_that_hangs_leaves_the_outcome_unknown_and_it_is_not_sent_again(
    app, client, use_provider, fake_providers, work
):
    """The request went out and no answer came: the provider may have the message. It is not retried, nor
    sent again by retry-failed unless asked: one hung provider used to deliver four copies, then two more."""
    use_provider("twilio", PROVIDER_READ_TIMEOUT=0.5)
    customer, campaign = one_message(app, "twilio")
    fake_providers.script("twilio", customer.phone, hang(10), accept())
    started = time.monotonic()
    send(client, campaign.id, [customer.id])
    work()
    # The job gave up on the hung request after its 0.5 s read timeout, and did not wait the 10 s out (the
    # bound leaves room for a loaded machine).
    assert time.monotonic() - started < 8
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"], row["error_class"], row["error_code"]) == (
        "failed",
        0,
        "unknown",
        "no_answer",
    )
    assert "may have taken it" in row["last_error"]
    assert len(fake_providers.requests("twilio")) == 1  # one attempt reached the provider: no automatic retry
    assert detail(client, campaign.id)["status"] == "failed"

    answer = client.post(f"/campaigns/{campaign.id}/retry-failed").get_json()
    assert (answer["requeued"], answer["not_retryable"], answer["unknown_left"]) == (0, 0, 1)
    work()
    assert len(fake_providers.requests("twilio")) == 1  # still one

    answer = client.post(f"/campaigns/{campaign.id}/retry-failed", json={"include_unknown": True}).get_json()
    assert (answer["requeued"], answer["unknown_left"]) == (1, 0)
    work()
    assert len(fake_providers.requests("twilio")) == 2  # asked for: sent again
    assert messages(client, campaign.id)[0]["status"] == "sent"


def test_with_retry_unknown_a_hung_provider_is_tried_again(app, client, use_provider, fake_providers, work):
    use_provider("twilio", PROVIDER_READ_TIMEOUT=0.5, RETRY_UNKNOWN=True)
    customer, campaign = one_message(app, "twilio")
    fake_providers.script("twilio", customer.phone, hang(3), accept())
    send(client, campaign.id, [customer.id])
    work()
    [row] = messages(client, campaign.id)
    assert (row["status"], row["retry_count"], row["error_class"]) == ("sent", 1, "unknown")
    assert len(fake_providers.requests("twilio")) == 2


def test_whatsapp_receipts_in_any_order_never_step_back(app, client, use_provider, fake_providers, work):
    use_provider("whatsapp_cloud")
    customer, campaign = one_message(app, "whatsapp_cloud")
    send(client, campaign.id, [customer.id])
    work()
    wamid = fake_providers.requests("whatsapp")[0].message_id
    read = fake_providers.send_receipt("whatsapp", wamid, "read")  # read before delivered: Meta may skip it
    assert (read.status, read.json()["applied"]) == (200, 1)
    [row] = messages(client, campaign.id)
    assert row["status"] == "delivered" and row["read_at"] is not None
    for late in ("delivered", "sent", "read"):  # late, out of order, repeated
        answer = fake_providers.send_receipt("whatsapp", wamid, late)
        assert answer.status == 200, answer.body
    [after] = messages(client, campaign.id)
    assert (after["status"], after["read_at"]) == ("delivered", row["read_at"])
    assert detail(client, campaign.id)["stats"] == stats(total=1, delivered=1, read=1)


def test_many_whatsapp_statuses_in_one_post(app, client, use_provider, fake_providers, work):
    use_provider("whatsapp_cloud")
    customers = [make_customer() for _ in range(3)]
    campaign = make_campaign(channel="whatsapp", base_template="Hi")
    send(client, campaign.id, [c.id for c in customers])
    work()
    wamids = [r.message_id for r in fake_providers.requests("whatsapp")]
    answer = fake_providers.send_receipts(
        "whatsapp", [(wamids[0], "delivered"), (wamids[1], "failed", [131026]), (wamids[2], "sent")]
    )
    assert answer.json() == {
        "applied": 2,
        "unchanged": 0,
        "kept": 0,
        "ignored": 1,
        "invalid": 0,
        "deferred": 0,
        "inbound": {"opted_out": 0, "opted_in": 0, "ignored": 0, "invalid": 0, "deferred": 0},
    }
    assert detail(client, campaign.id)["stats"] == stats(total=3, sent=1, delivered=1, failed=1)
    failed = next(m for m in messages(client, campaign.id) if m["status"] == "failed")
    assert failed["error_code"] == "131026"


def test_a_receipt_before_the_provider_id_is_committed_is_kept_then_applied(
    app, client, use_provider, fake_providers, work
):
    use_provider("twilio")
    fake_providers.auto_receipts = {"twilio": "delivered"}
    fake_providers.receipts_before_answer = True  # the receipt beats the worker's commit
    customer, campaign = one_message(app, "twilio")
    send(client, campaign.id, [customer.id])
    work()
    fake_providers.drain()
    [callback] = fake_providers.callbacks("twilio")
    assert (callback.status, callback.json()["kept"]) == (200, 1)
    [row] = messages(client, campaign.id)
    assert row["status"] == "delivered"  # applied by the send job, right after its commit
    assert db.session.scalar(db.select(db.func.count()).select_from(db.text("delivery_receipts"))) == 0


def test_a_receipt_for_an_id_no_message_has_is_answered_and_kept(app, client, use_provider, fake_providers):
    use_provider("africastalking")
    answer = fake_providers.send_receipt("africastalking", "ATXid_unknown", "Failed", phone="+254711000001")
    assert (answer.status, answer.json()["kept"]) == (200, 1)
    kept = db.session.execute(db.text("SELECT provider, provider_message_id, status FROM delivery_receipts")).all()
    assert [tuple(row) for row in kept] == [("africastalking", "ATXid_unknown", "undelivered")]


@pytest.mark.parametrize(
    ("provider", "options"),
    [
        ("twilio", {"sign": False}),
        ("twilio", {"auth_token": "not-the-token"}),
        ("whatsapp", {"sign": False}),
        ("whatsapp", {"app_secret": "not-the-secret"}),
        ("africastalking", {"token": None}),
        ("africastalking", {"token": "wrong"}),
    ],
)
def test_a_receipt_without_the_providers_proof_is_403_and_changes_nothing(
    app, client, use_provider, fake_providers, work, provider, options
):
    service_name = {v: k for k, v in FAKE.items()}[provider]
    use_provider(service_name)
    customer, campaign = one_message(app, service_name)
    send(client, campaign.id, [customer.id])
    work()
    message_id = fake_providers.requests(provider)[0].message_id
    status = {"africastalking": "Success", "twilio": "delivered", "whatsapp": "delivered"}[provider]
    answer = fake_providers.send_receipt(provider, message_id, status, **options)
    assert answer.status == 403
    assert answer.json()["code"] == 403
    assert messages(client, campaign.id)[0]["status"] == "sent"


def test_webhooks_refuse_everything_while_their_secret_is_not_set(app, client, fake_providers, live_server):
    """Without WEBHOOK_TOKEN (the mock provider's defaults), no token is right: not even an empty one."""
    answer = fake_providers.africastalking_receipt("ATXid_1", "Success", phone="+254711000001", token="")
    assert answer.status == 403
    assert fake_providers.verify_webhook(live_server, "", "123").status == 403


def test_whatsapp_webhook_verification_echoes_the_challenge(app, use_provider, fake_providers, live_server):
    use_provider("whatsapp_cloud")
    answer = fake_providers.verify_webhook(live_server, "verify-me", "1158201444")
    assert (answer.status, answer.body) == (200, "1158201444")
    assert answer.headers["content-type"].startswith("text/plain")
    assert fake_providers.verify_webhook(live_server, "wrong", "1158201444").status == 403


def test_webhooks_need_no_api_key_and_are_not_rate_limited(app, use_provider, fake_providers, client, work):
    app.config["API_RATE_LIMIT"] = "2 per minute"
    use_provider("twilio")
    customer, campaign = one_message(app, "twilio")
    send(client, campaign.id, [customer.id])
    work()
    sid = fake_providers.requests("twilio")[0].message_id
    answers = [fake_providers.send_receipt("twilio", sid, "sent").status for _ in range(5)]
    assert answers == [200] * 5


def test_the_mock_provider_is_the_default_and_records_its_id(client, work):
    customer = make_customer()
    campaign = make_campaign()
    send(client, campaign.id, [customer.id])
    work()
    [row] = messages(client, campaign.id)
    assert (row["status"], row["provider"], row["provider_message_id"]) == ("sent", "mock", f"mock-{row['id']}")


def test_a_message_taken_by_a_provider_keeps_its_id_unique(app, client, use_provider, fake_providers, work):
    use_provider("twilio")
    customer, campaign = one_message(app, "twilio")
    send(client, campaign.id, [customer.id])
    work()
    stored = db.session.scalars(db.select(OutboundMessage.provider_message_id)).all()
    assert stored == [fake_providers.requests("twilio")[0].message_id]


def test_the_reconciler_applies_a_kept_receipt_whose_message_came_later(
    app, client, use_provider, fake_providers, work
):
    """The race the send job's own check cannot close: the receipt was kept just after the job looked."""
    use_provider("twilio")
    customer, campaign = one_message(app, "twilio")
    send(client, campaign.id, [customer.id])
    work()
    sid = fake_providers.requests("twilio")[0].message_id
    db.session.add(DeliveryReceipt(provider="twilio", provider_message_id=sid, status="delivered"))
    db.session.add(DeliveryReceipt(provider="twilio", provider_message_id="SMnever", status="delivered"))
    db.session.commit()
    assert reconcile().applied_receipts == 1
    assert messages(client, campaign.id)[0]["status"] == "delivered"
    kept = db.session.scalars(db.select(DeliveryReceipt.provider_message_id)).all()
    assert kept == ["SMnever"]  # kept for inspection
