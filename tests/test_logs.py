"""Structured logs: one JSON object a line, with the request id in the API and the job, campaign and
message ids in the worker."""

import json

import pytest

from app.customers import service as customer_service
from tests.factories import make_campaign, make_customers


def test_request_logs_carry_the_request_id(client, monkeypatch, log_lines):
    def broken(**query):
        raise RuntimeError("boom")

    monkeypatch.setattr(customer_service, "list_customers", broken)
    response = client.get("/customers", headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    [entry] = [e for e in log_lines() if e["message"] == "unhandled error"]
    assert entry["request_id"] == "req-42" and entry["level"] == "ERROR"
    assert "RuntimeError: boom" in entry["exception"]


def test_worker_logs_carry_job_campaign_and_message_ids(client, work, log_lines):
    ids = make_customers(2)
    campaign_id = make_campaign().id
    client.post(f"/campaigns/{campaign_id}/send", json={"customer_ids": ids})
    work()
    sent = [e for e in log_lines() if e["message"] == "message sent"]
    assert len(sent) == 2
    for entry in sent:
        assert entry["campaign_id"] == campaign_id
        assert entry["job_id"] == f"outbound_message-{entry['message_id']}-1"


@pytest.mark.real_only
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_worker_process_writes_only_json_lines_and_one_a_message_at_info(client, spawn_worker, level):
    ids = make_customers(2)
    client.post(f"/campaigns/{make_campaign().id}/send", json={"customer_ids": ids})
    worker = spawn_worker(LOG_LEVEL=level)
    assert worker.wait(timeout=60) == 0
    lines = worker.stderr.read().decode().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    sent = [e for e in entries if e["message"] == "message sent"]
    assert len(sent) == 2 and all({"job_id", "campaign_id", "message_id"} <= set(e) for e in sent)
    # RQ's own lines about each job (it took it, it ended, its result kept) carry its id, at DEBUG only.
    per_job = [e for e in entries if e["logger"] == "rq.worker" and "job_id" in e and e["level"] in ("DEBUG", "INFO")]
    ok = [e for e in per_job if e["message"].endswith("Job OK (" + e["job_id"] + ")")]
    if level == "INFO":
        assert per_job == []
        assert len([e for e in entries if e.get("message_id")]) == 2  # one line a message
    else:
        assert len(ok) == 2


@pytest.mark.real_only
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_send_through_a_provider_writes_no_http_client_line_below_debug(
    client, spawn_worker, fake_providers, live_server, level
):
    """httpx writes a line per request to the provider ("HTTP Request: POST ..."); at INFO the worker
    leaves it out, and a message's send is the service's one line."""
    ids = make_customers(3)
    client.post(f"/campaigns/{make_campaign().id}/send", json={"customer_ids": ids})
    fake = fake_providers
    worker = spawn_worker(
        LOG_LEVEL=level,
        SMS_PROVIDER="twilio",
        TWILIO_ACCOUNT_SID=fake.twilio_account_sid,
        TWILIO_AUTH_TOKEN=fake.twilio_auth_token,
        TWILIO_FROM=fake.twilio_service_from,
        TWILIO_BASE_URL=fake.base_url,
        PUBLIC_BASE_URL=live_server,
    )
    assert worker.wait(timeout=120) == 0, worker.stderr.read().decode()[-2000:]
    entries = [json.loads(line) for line in worker.stderr.read().decode().splitlines()]
    assert len(fake.requests("twilio")) == 3
    http_lines = [e for e in entries if e["logger"].startswith(("httpx", "httpcore"))]
    if level == "INFO":
        assert http_lines == []
        assert len([e for e in entries if e.get("message_id")]) == 3  # one line a message
    else:
        assert any("HTTP Request: POST" in e["message"] for e in http_lines)
