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
def test_worker_process_writes_only_json_lines(client, spawn_worker):
    ids = make_customers(2)
    client.post(f"/campaigns/{make_campaign().id}/send", json={"customer_ids": ids})
    worker = spawn_worker(LOG_LEVEL="INFO")
    assert worker.wait(timeout=60) == 0
    lines = worker.stderr.read().decode().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    sent = [e for e in entries if e["message"] == "message sent"]
    assert len(sent) == 2 and all({"job_id", "campaign_id", "message_id"} <= set(e) for e in sent)
    # RQ's own lines about a job's outcome carry its id too.
    ok = [
        e
        for e in entries
        if e["logger"] == "rq.worker" and e["message"].endswith("Job OK (" + e.get("job_id", "") + ")")
    ]
    assert len(ok) == 2
