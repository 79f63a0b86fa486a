"""The cost of a scrape of `GET /metrics` beside a million messages.

    python bench/metrics.py [--messages 1000000] [--campaigns 1000] [--scrapes 50]

Builds `--messages` messages over `--campaigns` campaigns of every status (SQL `generate_series`) in
BENCH_DATABASE_URL, then records a busy service's worth of series into BENCH_REDIS_URL through the app's
own recorder: requests to every route with several statuses, send outcomes of both channels and every
class, provider latencies, receipts. Times `--scrapes` scrapes through the Flask test client (in this
process: the request's whole path, the key check and the rate limiter included) and as many over HTTP
against the Procfile's web command (two gunicorn workers). Prints a Markdown table: median, p95 and
worst time, and the size of the answer; then the median time of the scrape's one SQL query beside the
messages' `GROUP BY status` it never runs.

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench_metrics; dropped
and recreated) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/13; flushed).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/campaigns_bench_metrics")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
ENV = {
    **os.environ,
    "DATABASE_URL": DATABASE_URL,
    "REDIS_URL": REDIS_URL,
    "API_KEYS": "bench-key",
    "API_RATE_LIMIT": "1000000 per minute",
    "LOG_LEVEL": "WARNING",
    "WEB_CONCURRENCY": "2",
}
STATUSES = ("draft", "scheduled", "sending", "paused", "sent", "failed", "canceled")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(messages: int, campaigns: int) -> None:
    """A fresh database: `campaigns` campaigns of every status, and `messages` messages spread over them."""
    name = DATABASE_URL.rsplit("/", 1)[1]
    with psycopg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    upgrade = [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"]
    subprocess.run(upgrade, cwd=ROOT, env=ENV, check=True, capture_output=True)
    per_campaign = -(-messages // campaigns)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (phone, first_name, created_at, updated_at) "
            "SELECT '+2547' || lpad(g::text, 8, '0'), 'C' || g, now(), now() FROM generate_series(1, %s) g",
            (per_campaign,),
        )
        conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "SELECT 'c' || g, CASE WHEN g %% 3 = 0 THEN 'whatsapp' ELSE 'sms' END, (%s::text[])[1 + g %% 7], "
            "'Hi {first_name}', now(), now() FROM generate_series(1, %s) g",
            (list(STATUSES), campaigns),
        )
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, created_at, updated_at) "
            "SELECT c, m, CASE WHEN m %% 100 = 0 THEN 'failed' WHEN m %% 10 = 0 THEN 'pending' ELSE 'sent' END, 0, "
            "now(), now() FROM generate_series(1, %s) c, generate_series(1, %s) m "
            "WHERE (c - 1) * %s + m <= %s",
            (campaigns, per_campaign, per_campaign, messages),
        )
        conn.execute("VACUUM ANALYZE")
        count = conn.execute("SELECT count(*) FROM outbound_messages").fetchone()[0]
    log(f"{count:,} messages in {campaigns:,} campaigns")


def record(app, messages: int) -> None:
    """Series as a busy service leaves them: every route and method with six statuses and its latencies,
    every send outcome of three providers, their latencies and receipts; `messages` sends in all. Flushed
    to Redis."""
    from app import metrics

    recorder = app.extensions["metrics"]
    rng = random.Random(1)
    routes = {
        (m, metrics.endpoint_label(r.rule)) for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}
    }
    for method, endpoint in sorted(routes | {("GET", metrics.UNMATCHED)}):
        for status in ("200", "401", "404", "422", "429", "503"):
            recorder.count(metrics.HTTP_REQUESTS, (method, endpoint, status), rng.randint(1, 10_000))
        for _ in range(50):
            recorder.observe(metrics.HTTP_DURATION, (method, endpoint), rng.expovariate(20))
    outcomes = [
        ("sent", ""),
        ("failed", "permanent"),
        ("failed", "transient"),
        ("retry", "transient"),
        ("paused", "account"),
        ("throttled", ""),
        ("limited", ""),
        ("quiet_hours", ""),
        ("held", ""),
        ("canceled", ""),
        ("skipped", ""),
    ]
    for channel, provider in (("sms", "africastalking"), ("sms", "twilio"), ("whatsapp", "whatsapp_cloud")):
        for outcome, error_class in outcomes:
            share = 0.9 if outcome == "sent" else 0.01
            recorder.count(metrics.MESSAGES, (channel, provider, outcome, error_class), int(messages * share / 3))
        for _ in range(2_000):
            recorder.observe(metrics.SEND_DURATION, (provider,), rng.lognormvariate(-1.6, 0.5))
        for status in ("delivered", "undelivered", "failed", "sent"):
            for result in ("applied", "unchanged", "kept"):
                recorder.count(metrics.RECEIPTS, (provider, status, result), rng.randint(1, messages // 3))
    assert recorder.flush()


def percentile(times: list[float], share: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def time_test_client(app, scrapes: int) -> tuple[list[float], bytes]:
    client = app.test_client()
    headers = {"Authorization": "Bearer bench-key"}
    client.get("/metrics", headers=headers)  # connections opened once, as in a running process
    times = []
    for _ in range(scrapes):
        start = time.perf_counter()
        response = client.get("/metrics", headers=headers)
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, response.data
    return times, response.data


def time_web(scrapes: int) -> list[float]:
    from web import Web

    web = Web(ENV, None)
    try:
        for _ in range(10):
            web.get("/metrics")  # each gunicorn worker's first requests open its connections and fill its caches
        times = []
        for _ in range(scrapes):
            status, took = web.get("/metrics")
            assert status == 200, status
            times.append(took)
    finally:
        web.stop()
    return times


def time_queries(runs: int = 5) -> list[tuple[str, float]]:
    """Median ms of the scrape's one query, and of the messages' own GROUP BY it never runs."""
    queries = {
        "campaigns by status (the scrape's query)": "SELECT status, count(*) FROM campaigns GROUP BY status",
        "messages by status (never run by a scrape)": "SELECT status, count(*) FROM outbound_messages GROUP BY status",
    }
    rows = []
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for label, sql in queries.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                conn.execute(sql).fetchall()
                times.append((time.perf_counter() - start) * 1000)
            rows.append((label, statistics.median(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--campaigns", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    log("building the database")
    build(args.messages, args.campaigns)
    Redis.from_url(REDIS_URL).flushdb()
    os.environ.update(ENV)
    from app import create_app

    app = create_app("config.ProductionConfig")
    record(app, args.messages)
    rows = []
    times, body = time_test_client(app, args.scrapes)
    rows.append(("Flask test client, in process", times))
    rows.append(("HTTP, the Procfile's web (2 gunicorn workers)", time_web(args.scrapes)))
    lines = body.decode().splitlines()
    samples = sum(1 for line in lines if line and not line.startswith("#"))
    print(
        f"{args.messages:,} messages in {args.campaigns:,} campaigns; {samples:,} samples, {len(body) / 1024:.0f} KB "
        f"an answer; {args.scrapes} scrapes each.\n"
    )
    print("| scrape through | median ms | p95 ms | worst ms |")
    print("| --- | --- | --- | --- |")
    for label, times in rows:
        ms = [t * 1000 for t in times]
        print(f"| {label} | {statistics.median(ms):.1f} | {percentile(ms, 0.95):.1f} | {max(ms):.1f} |")
    print("\n| query | median ms |\n| --- | --- |")
    for label, ms in time_queries():
        print(f"| {label} | {ms:.1f} |")


if __name__ == "__main__":
    main()
