"""A PostgreSQL outage in the middle of a campaign: how many messages reach the provider twice.

    python bench/outage.py                       # 2,000 messages, a 30 s outage once a third are sent
    python bench/outage.py --messages 1000 --outage 10

It starts a private PostgreSQL cluster (the tests' `PgServer`: initdb in a temporary folder, a free port),
the Procfile's web and one `worker` process against it (the mock provider, 50 ms a send, logging each
attempt), sends one campaign, stops the cluster once a third of it is sent, starts it again `--outage`
seconds later, and waits for the campaign to end. It prints the sends that reached the provider twice, the
records and receipts kept in Redis meanwhile, and how long after the database's return the campaign ended.

Settings: BENCH_REDIS_URL (see bench/run.py; flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from run import REDIS_URL, log  # noqa: E402
from web import Web  # noqa: E402

from tests.pg_server import PgServer  # noqa: E402


def sent_so_far(url: str, campaign_id: int) -> tuple[str, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
        status = conn.execute("SELECT status FROM campaigns WHERE id = %s", (campaign_id,)).fetchone()[0]
        sent = conn.execute(
            "SELECT count(*) FROM outbound_messages WHERE campaign_id = %s AND status = 'sent'", (campaign_id,)
        ).fetchone()[0]
    return status, sent


def main() -> None:
    parser = argparse.ArgumentParser(description="A PostgreSQL outage mid-campaign; prints a Markdown table.")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the database is down")
    args = parser.parse_args()

    server = PgServer()
    server.init()
    server.start()
    url = server.create_database("outage")
    sends = Path(tempfile.mkdtemp(prefix="outage-")) / "sends.jsonl"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "API_KEYS": "bench-key",
        "API_RATE_LIMIT": "1000000 per minute",
        "MOCK_SENDER_LATENCY": "0.05",
        "MOCK_SENDER_LOG": str(sends),
    }
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    migrate = [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"]
    subprocess.run(migrate, cwd=ROOT, env=env, check=True, capture_output=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (phone, first_name, location, created_at, updated_at) "
            "SELECT '+2547' || lpad(n::text, 8, '0'), 'First' || n, 'outage', now(), now() "
            "FROM generate_series(1, %s) AS n",
            (args.messages,),
        )
    web = Web(env, None)
    worker = None
    try:
        campaign, _ = web.post(
            "/campaigns", {"name": "outage", "channel": "sms", "base_template": "Hi {first_name}"}, expect=201
        )
        web.post(f"/campaigns/{campaign['id']}/send", {"audience": {"location": "outage"}}, expect=202)
        stderr = Path(tempfile.mkdtemp(prefix="outage-")) / "worker.log"
        with open(stderr, "wb") as out:
            worker = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=out, stderr=out)
        while sent_so_far(url, campaign["id"])[1] < args.messages // 3:
            time.sleep(0.2)
        log(f"stopping the database for {args.outage:.0f} s")
        server.stop()
        time.sleep(args.outage)
        server.start()
        back = time.monotonic()
        log("the database is back")
        while True:
            try:
                status, _ = sent_so_far(url, campaign["id"])
            except psycopg.Error:
                status = "unknown"
            if status == "sent":
                break
            time.sleep(0.2)
        ended_after = time.monotonic() - back
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait()
        web.stop()
        server.destroy()
    attempts = Counter(json.loads(line)["message_id"] for line in sends.read_text().splitlines())
    logged = stderr.read_text()
    print(
        f"\n{args.messages} messages, one worker (mock provider, 50 ms a send), PostgreSQL down {args.outage:.0f} s:\n"
    )
    print("| messages sent | sent twice | sends' records kept in Redis | campaign `sent` after the return (s) |")
    print("| --- | --- | --- | --- |")
    print(
        f"| {len(attempts)} | {sum(1 for n in attempts.values() if n > 1)} "
        f"| {logged.count('record waits in Redis')} | {ended_after:.1f} |"
    )


if __name__ == "__main__":
    main()
