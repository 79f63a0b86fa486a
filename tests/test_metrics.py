"""GET /metrics: the key it needs, the Prometheus text format, what each kind of event adds, the gauges read
when scraped, a scrape without Redis, and the totals of several web and worker processes added up."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue
from sqlalchemy import text

from app import metrics
from app.customers import optouts
from app.extensions import db
from app.messaging.app_worker import build_worker
from app.messaging.send import throttle
from app.models import CampaignStatus, OptOutSource
from app.queues import redis_options
from tests.conftest import ROOT, TEST_API_KEY, kill_group
from tests.factories import make_campaign, make_customer, make_customers
from tests.helpers import free_port, procfile_command
from tests.test_providers import run_postponed
from tests.test_web_process import get as http_get
from tests.test_worker import start

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(autouse=True)
def no_counts_of_earlier_tests():
    """Apps of earlier tests may still hold counts for the shared test Redis; written now, before the
    `redis_conn` fixture empties it, they cannot land in this test's totals later."""
    metrics.flush_all()


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse(response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the scrape has no such series."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def message_count(samples: Samples, outcome: str, error_class: str = "", provider: str = "mock", channel: str = "sms"):
    labels = {"channel": channel, "provider": provider, "outcome": outcome, "error_class": error_class}
    return value(samples, "dispatch_messages_total", **labels)


def test_metrics_need_the_api_key_and_answer_in_the_prometheus_text_format(client, anonymous_client):
    refused = anonymous_client.get("/metrics")
    assert refused.status_code == 401 and refused.get_json()["code"] == 401
    wrong = anonymous_client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = parse(response.get_data(as_text=True))
    assert value(samples, "dispatch_metrics_source_up", source="redis") == 1
    assert value(samples, "dispatch_metrics_source_up", source="database") == 1
    # The refusals before it are counted, under the route, not the path.
    assert value(samples, "dispatch_http_requests_total", method="GET", endpoint="/metrics", status="401") == 2


def test_the_operation_is_documented_as_text_behind_the_key(anonymous_client):
    operation = anonymous_client.get("/openapi.json").get_json()["paths"]["/metrics"]["get"]
    assert "security" not in operation  # the document-wide bearer key applies
    assert list(operation["responses"]["200"]["content"]) == ["text/plain"]
    assert {"401", "429", "503"} <= set(operation["responses"])


def test_requests_are_counted_by_route_template_method_and_status(client, anonymous_client):
    campaign = make_campaign()
    for _ in range(3):
        assert client.get("/campaigns").status_code == 200
    assert client.get(f"/campaigns/{campaign.id}").status_code == 200
    assert client.get("/campaigns/999").status_code == 404
    assert client.post("/campaigns", json={"name": ""}).status_code == 422
    assert client.get("/no-such-page").status_code == 404
    assert client.get("/no-such-page/either").status_code == 404
    assert anonymous_client.get("/customers").status_code == 401
    assert client.open("/campaigns", method="BREW").status_code == 405
    samples = scrape(client)

    def requests(method: str, endpoint: str, status: str) -> float:
        return value(samples, "dispatch_http_requests_total", method=method, endpoint=endpoint, status=status)

    assert requests("GET", "/campaigns", "200") == 3
    assert requests("GET", "/campaigns/{campaign_id}", "200") == 1
    assert requests("GET", "/campaigns/{campaign_id}", "404") == 1
    assert requests("POST", "/campaigns", "422") == 1
    assert requests("GET", "unmatched", "404") == 2
    assert requests("GET", "/customers", "401") == 1
    assert requests("other", "unmatched", "405") == 1
    endpoints = {dict(labels)["endpoint"] for labels in series(samples, "dispatch_http_requests_total")}
    assert not any("999" in e or "no-such" in e or str(campaign.id) in e for e in endpoints)

    histogram = {"method": "GET", "endpoint": "/campaigns"}
    assert value(samples, "dispatch_http_request_duration_seconds_count", **histogram) == 3
    assert value(samples, "dispatch_http_request_duration_seconds_bucket", **histogram, le="+Inf") == 3
    assert value(samples, "dispatch_http_request_duration_seconds_sum", **histogram) > 0
    buckets = [
        v
        for labels, v in series(samples, "dispatch_http_request_duration_seconds_bucket").items()
        if {("method", "GET"), ("endpoint", "/campaigns")} <= labels
    ]
    assert len(buckets) == len(metrics.HTTP_DURATION.buckets) + 1
    bounds = sorted(
        (float(dict(labels)["le"]), v)
        for labels, v in series(samples, "dispatch_http_request_duration_seconds_bucket").items()
        if {("method", "GET"), ("endpoint", "/campaigns")} <= labels
    )
    assert [v for _, v in bounds] == sorted(v for _, v in bounds)  # cumulative


def test_send_outcomes_and_provider_latency_are_counted(app, client, work, redis_conn):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 1  # every message fails once, then is sent
    app.extensions["metrics"].interval = 3600  # no flush by the thread: only the worker's own when it stops
    ids = make_customers(3)
    campaign = make_campaign()
    start(client, campaign.id, ids)
    optouts.opt_out_ids([ids[2]], "sms", OptOutSource.API)  # after it was queued: canceled, never sent
    db.session.commit()
    queued = scrape(client)
    assert value(queued, "dispatch_queue_jobs", queue="campaign_sends", state="queued") == 3
    assert message_count(queued, "sent") == 0

    work()
    assert redis_conn.hlen(metrics.MESSAGES.key) == 3  # written when the burst worker stopped, before any scrape
    samples = scrape(client)
    assert message_count(samples, "retry", "transient") == 2
    assert message_count(samples, "sent") == 2
    assert message_count(samples, "canceled") == 1
    assert sum(series(samples, "dispatch_messages_total").values()) == 5
    assert value(samples, "dispatch_provider_send_duration_seconds_count", provider="mock") == 4
    assert value(samples, "dispatch_provider_send_duration_seconds_bucket", provider="mock", le="+Inf") == 4
    assert value(samples, "dispatch_queue_jobs", queue="campaign_sends", state="queued") == 0
    assert value(samples, "dispatch_campaigns", status="sent") == 1


def test_failed_messages_are_counted_by_class(app, client, work):
    app.config["MOCK_SENDER_FAIL_ATTEMPTS"] = 99  # every attempt fails: three retries, then failed
    gone = make_customer()
    campaign = make_campaign()
    start(client, campaign.id, [make_customer().id, gone.id])
    # Deleted behind the API's back by the time the job runs: failed for good, without the provider.
    db.session.execute(text("DELETE FROM customers WHERE id = :id"), {"id": gone.id})
    db.session.commit()
    work()
    samples = scrape(client)
    assert message_count(samples, "retry", "transient") == 3
    assert message_count(samples, "failed", "transient") == 1
    assert message_count(samples, "failed", "permanent") == 1
    assert value(samples, "dispatch_provider_send_duration_seconds_count", provider="mock") == 4
    assert value(samples, "dispatch_campaigns", status="failed") == 1


def test_refusals_throttling_and_receipts_of_a_provider_are_counted(
    app, client, use_provider, fake_providers, work, redis_conn
):
    from tests.fake_providers import accept, refuse
    from tests.fake_providers import throttle as throttled

    use_provider("twilio")
    refused, slowed, taken = make_customer(), make_customer(), make_customer()
    fake_providers.script("twilio", refused.phone, refuse(21211))
    fake_providers.script("twilio", slowed.phone, throttled(retry_after=1), accept())
    campaign = make_campaign()
    start(client, campaign.id, [refused.id, slowed.id, taken.id])
    work()
    assert len(run_postponed(app, redis_conn, work)) == 1  # the throttled one, sent now
    sent = {r.params["To"]: r.message_id for r in fake_providers.requests("twilio") if r.message_id}
    assert fake_providers.send_receipt("twilio", sent[taken.phone], "delivered").status == 200
    assert fake_providers.send_receipt("twilio", sent[taken.phone], "delivered").status == 200  # a repeat
    unknown = fake_providers.send_receipt("twilio", "SM" + "0" * 32, "delivered", to=taken.phone)
    assert unknown.status == 200 and unknown.json()["kept"] == 1  # no message has that id

    paused = make_campaign()
    account = make_customer()
    fake_providers.script("twilio", account.phone, refuse(20003))
    start(client, paused.id, [account.id])
    work()

    samples = scrape(client)
    assert message_count(samples, "failed", "permanent", provider="twilio") == 1
    assert message_count(samples, "throttled", provider="twilio") == 1
    assert message_count(samples, "sent", provider="twilio") == 2
    assert message_count(samples, "paused", "account", provider="twilio") == 1
    assert value(samples, "dispatch_provider_send_duration_seconds_count", provider="twilio") == 5

    def receipts(result: str) -> float:
        return value(samples, "dispatch_receipts_total", provider="twilio", status="delivered", result=result)

    assert (receipts("applied"), receipts("unchanged"), receipts("kept")) == (1, 1, 1)
    webhook = {"method": "POST", "endpoint": "/webhooks/twilio/status", "status": "200"}
    assert value(samples, "dispatch_http_requests_total", **webhook) == 3
    assert value(samples, "dispatch_campaigns", status="paused") == 1
    assert value(samples, "dispatch_campaigns", status="sent") == 1


@pytest.mark.real_only
def test_a_job_the_throughput_limit_hands_back_is_counted(app, client, use_provider, fake_providers, work):
    use_provider("twilio", SMS_RATE_LIMIT="1 per 2 seconds")
    throttle.take_slot(app, "sms")  # another worker just sent: the next slot is 2 s away, beyond MAX_WAIT
    start(client, make_campaign().id, [make_customer().id])
    work()
    samples = scrape(client)
    assert message_count(samples, "limited", provider="twilio") == 1
    assert message_count(samples, "sent", provider="twilio") == 0
    assert value(samples, "dispatch_queue_jobs", queue="campaign_sends", state="scheduled") == 1


def test_campaigns_by_status_queues_and_live_workers_are_read_when_scraped(app, client):
    for status, count in (("draft", 2), ("scheduled", 1), ("canceled", 1)):
        for _ in range(count):
            make_campaign(status=status)
    start(client, make_campaign().id, make_customers(2))
    worker = build_worker(app)
    worker.register_birth()
    worker.heartbeat()  # what a worker does before it waits for a job
    try:
        samples = scrape(client)
    finally:
        worker.register_death()
    assert series(samples, "dispatch_campaigns") == {
        frozenset({("status", s)}): float(n)
        for s, n in {
            "draft": 2,
            "scheduled": 1,
            "sending": 1,
            "paused": 0,
            "sent": 0,
            "failed": 0,
            "canceled": 1,
        }.items()
    }
    assert value(samples, "dispatch_queue_jobs", queue="campaign_sends", state="queued") == 2
    assert value(samples, "dispatch_queue_jobs", queue="campaign_control", state="queued") == 0
    states = {dict(labels)["state"] for labels in series(samples, "dispatch_queue_jobs")}
    assert states == set(metrics.QUEUE_STATES)
    assert value(samples, "dispatch_workers") == 1
    assert value(scrape(client), "dispatch_workers") == 0  # a clean exit leaves at once


def crash() -> None:
    """A job that fails (RQ keeps it in the queue's failed registry)."""
    raise RuntimeError("boom")


def test_jobs_that_failed_and_wait_are_counted_per_queue(app, client, work, redis_conn):
    control = Queue(app.config["CONTROL_QUEUE"], connection=redis_conn)
    control.enqueue(crash)
    control.enqueue_in(timedelta(hours=1), crash)
    work()
    samples = scrape(client)
    assert value(samples, "dispatch_queue_jobs", queue="campaign_control", state="failed") == 1
    assert value(samples, "dispatch_queue_jobs", queue="campaign_control", state="scheduled") == 1
    assert value(samples, "dispatch_queue_jobs", queue="campaign_control", state="queued") == 0
    assert value(samples, "dispatch_queue_jobs", queue="campaign_sends", state="failed") == 0


def test_scheduled_jobs_overdue_by_more_than_thirty_seconds_are_counted_per_queue(app, client, redis_conn):
    now = datetime.now(UTC)
    sends = Queue(app.config["SEND_QUEUE"], connection=redis_conn)
    for seconds_ago in (95, 32, 10, -60):  # two overdue, one due but not yet overdue, one ahead
        sends.enqueue_at(now - timedelta(seconds=seconds_ago), crash)
    samples = scrape(client)
    assert value(samples, "dispatch_scheduled_jobs_overdue", queue="campaign_sends") == 2
    assert value(samples, "dispatch_scheduled_jobs_overdue", queue="campaign_control") == 0
    assert value(samples, "dispatch_queue_jobs", queue="campaign_sends", state="scheduled") == 4


def test_a_scrape_without_redis_answers_at_once_with_the_database_gauges_and_the_counts_are_kept(
    app, client, private_redis
):
    app.extensions["redis"] = Redis.from_url(private_redis.url, **redis_options(app.config))
    make_campaign()
    assert client.get("/campaigns").status_code == 200
    private_redis.stop()

    started = time.monotonic()
    response = client.get("/metrics")
    took = time.monotonic() - started
    assert response.status_code == 200 and took < 1.0
    samples = parse(response.get_data(as_text=True))
    assert value(samples, "dispatch_metrics_source_up", source="redis") == 0
    assert value(samples, "dispatch_metrics_source_up", source="database") == 1
    assert value(samples, "dispatch_campaigns", status="draft") == 1
    assert not series(samples, "dispatch_http_requests_total")
    assert not series(samples, "dispatch_workers")
    assert metrics.flush(app) is False  # the flush thread fails the same way, and keeps them

    private_redis.start()  # empty, as a Redis that lost its data
    samples = scrape(client)
    assert value(samples, "dispatch_metrics_source_up", source="redis") == 1
    assert value(samples, "dispatch_http_requests_total", method="GET", endpoint="/campaigns", status="200") == 1
    assert value(samples, "dispatch_http_requests_total", method="GET", endpoint="/metrics", status="200") == 1
    app.extensions["metrics"].take()  # the last scrape's own count: the server goes away with the test


@pytest.mark.real_only
def test_a_stalled_redis_holds_a_scrape_no_longer_than_the_socket_timeout(app, client, private_redis):
    app.config["REDIS_SOCKET_TIMEOUT"] = 0.5
    app.extensions["redis"] = Redis.from_url(private_redis.url, **redis_options(app.config))
    assert client.get("/metrics").status_code == 200  # connected before it stalls
    private_redis.stall()
    try:
        started = time.monotonic()
        response = client.get("/metrics")
        took = time.monotonic() - started
    finally:
        private_redis.resume()
    assert response.status_code == 200 and took < 0.5 + 1.0
    samples = parse(response.get_data(as_text=True))
    assert value(samples, "dispatch_metrics_source_up", source="redis") == 0
    assert value(samples, "dispatch_metrics_source_up", source="database") == 1
    assert len(series(samples, "dispatch_campaigns")) == len(CampaignStatus.ALL)
    app.extensions["metrics"].take()  # the scrapes' own counts: the server goes away with the test


def test_a_process_keeps_a_bounded_number_of_series_between_flushes(app, redis_conn, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    recorder = metrics.Recorder(app)
    for n in range(5):
        recorder.count(metrics.RECEIPTS, ("twilio", f"status-{n}", "applied"))
    recorder.count(metrics.RECEIPTS, ("twilio", "status-0", "applied"), 2)  # a series it has goes on counting
    assert recorder.flush()
    stored = {json.loads(k)[1]: int(v) for k, v in redis_conn.hgetall(metrics.RECEIPTS.key).items()}
    assert stored == {"status-0": 3, "status-1": 1, "status-2": 1}


def test_route_templates_and_outcome_labels():
    assert metrics.endpoint_label("/campaigns/<int:campaign_id>/messages") == "/campaigns/{campaign_id}/messages"
    assert metrics.endpoint_label("/docs/assets/<path:filename>") == "/docs/assets/{filename}"
    assert metrics.endpoint_label("/health") == "/health"
    assert metrics.endpoint_label(None) == "unmatched"
    assert metrics.bucket_index((0.1, 1.0), 0.1) == 0
    assert metrics.bucket_index((0.1, 1.0), 0.5) == 1
    assert metrics.bucket_index((0.1, 1.0), 5.0) == 2


# --- several processes: gunicorn with three workers, two worker processes ----------------------------------

FLUSH_INTERVAL = 0.2


@pytest.fixture
def gunicorn(worker_env, tmp_path):
    """The Procfile's web process with three gunicorn workers, each request's pid in its access log;
    yields (base URL, the access log's path)."""
    port = free_port()
    access_log = tmp_path / "access.log"
    env = {
        **worker_env,
        "PORT": str(port),
        "WEB_CONCURRENCY": "3",
        "METRICS_FLUSH_INTERVAL": str(FLUSH_INTERVAL),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GUNICORN_CMD_ARGS": "--access-logformat '%(p)s %(m)s %(U)s %(s)s'",
    }
    with open(access_log, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_command('web')}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the web process did not start"
            try:
                if http_get(port, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", access_log
    finally:
        kill_group(proc)


def pids_that_answered(access_log: Path, path: str) -> set[str]:
    """The pids of the gunicorn workers that answered requests for `path` (`<pid> METHOD path status` lines)."""
    return set(re.findall(rf"^<(\d+)> \w+ {re.escape(path)} \d+$", access_log.read_text(), re.M))


@pytest.mark.real_only
def test_every_web_and_worker_process_adds_into_the_same_totals(app, gunicorn, spawn_worker):
    base_url, access_log = gunicorn
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    campaign = make_campaign()
    ids = make_customers(10)

    def get(path: str) -> httpx.Response:
        return httpx.get(base_url + path, headers=headers, timeout=10)  # a new connection each time

    assert (
        httpx.post(f"{base_url}/campaigns/{campaign.id}/send", json={"customer_ids": ids}, headers=headers).status_code
        == 202
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert {r.status_code for r in pool.map(lambda _: get("/customers"), range(40))} == {200}
    # Two worker processes; a flush interval too long to matter: what they did arrives by their final flush.
    workers = [spawn_worker(MOCK_SENDER_FAIL_ATTEMPTS=1, METRICS_FLUSH_INTERVAL=60) for _ in range(2)]
    for proc in workers:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    time.sleep(FLUSH_INTERVAL * 5)  # every gunicorn worker's flush thread has run

    with ThreadPoolExecutor(max_workers=4) as pool:
        scrapes = list(pool.map(lambda _: get("/metrics"), range(12)))
    assert {r.status_code for r in scrapes} == {200}
    assert len(pids_that_answered(access_log, "/customers")) >= 2  # the requests were spread over the workers
    assert len(pids_that_answered(access_log, "/metrics")) >= 2  # and so were the scrapes

    def totals(response: httpx.Response) -> Samples:
        """All but the scrapes' own requests, which each scrape adds to."""
        return {key: v for key, v in parse(response.text).items() if ("endpoint", "/metrics") not in key[1]}

    first = totals(scrapes[0])
    assert all(totals(r) == first for r in scrapes[1:])
    assert value(first, "dispatch_http_requests_total", method="GET", endpoint="/customers", status="200") == 40
    assert value(first, "dispatch_http_request_duration_seconds_count", method="GET", endpoint="/customers") == 40
    send = {"method": "POST", "endpoint": "/campaigns/{campaign_id}/send", "status": "202"}
    assert value(first, "dispatch_http_requests_total", **send) == 1
    assert message_count(first, "retry", "transient") == 10
    assert message_count(first, "sent") == 10
    assert value(first, "dispatch_provider_send_duration_seconds_count", provider="mock") == 20
    assert value(first, "dispatch_campaigns", status="sent") == 1
    assert value(first, "dispatch_workers") == 0

    live = spawn_worker(burst=False, WORKER_HEARTBEAT_INTERVAL=1)
    deadline = time.monotonic() + 30
    while value(parse(get("/metrics").text), "dispatch_workers") != 1:
        assert time.monotonic() < deadline, "the live worker was never counted"
        time.sleep(0.2)
    assert live.poll() is None


def test_a_stop_signal_during_the_exit_flush_ends_the_process_without_a_traceback():
    """A gunicorn worker signalled twice (by `flask up` or the platform, then by its master) got the second
    signal in its last metrics flush and wrote a traceback on its way out. The flush at exit ends quietly."""
    child = (
        "import signal\n"
        "from app import metrics\n"
        "class SignalledMidFlush:\n"
        "    def flush(self):\n"
        "        signal.raise_signal(signal.SIGINT)  # the second signal, while the last flush runs\n"
        "held = SignalledMidFlush()\n"
        "metrics._recorders.add(held)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0
