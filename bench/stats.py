"""Campaign stats under load: the detail and the list read while sends and receipts are recorded at full
speed, and what the counts cost the send job.

    python bench/stats.py                          # a 1,000,000-message campaign among 100
    python bench/stats.py --messages 200000 --sends 20000

It builds (in SQL) one campaign of `--messages` messages, nearly all sent, and 99 small ones, then sends
that campaign to `--sends` more customers through `POST /campaigns/{id}/send`. Through the Procfile's web
process it measures `GET /campaigns/{id}` and `GET /campaigns?page_size=100`:

- quiet: nothing else runs;
- under load: two `python worker.py` processes (mock provider, no latency) drain the queued sends, and
  32 connections post signed Twilio status callbacks for other messages, as fast as they go.

Then the send job's cost: the drain rate of one worker over `--drain` queued messages with the count
triggers enabled and disabled (alternated, twice each). Prints Markdown tables.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from receipts import TWILIO_SID, TWILIO_TOKEN, post_all, store_messages, twilio_requests  # noqa: E402
from run import DATABASE_URL, ROOT, Bench, log  # noqa: E402
from web import Web  # noqa: E402

TRIGGERS = ("outbound_messages_count_insert", "outbound_messages_count_update", "outbound_messages_count_delete")


def build(messages: int, small: int) -> int:
    """One campaign of `messages` messages (97% sent, the rest failed) and 99 of `small` each; returns the
    big one's id. Customers tagged `rest` are left for the sends."""
    add_customers(messages, "old")
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        big = conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, respect_quiet_hours, created_at, "
            "updated_at) VALUES ('big', 'sms', 'draft', 'Hi {first_name}', false, now(), now()) RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, segments, retry_count, created_at, "
            "updated_at) SELECT %s, id, CASE WHEN id %% 33 = 0 THEN 'failed' ELSE 'sent' END, 1, 0, now(), now() "
            "FROM customers",
            (big,),
        )
        for n in range(99):
            campaign = conn.execute(
                "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
                "VALUES (%s, 'sms', 'sent', 'Hi', now(), now()) RETURNING id",
                (f"small {n}",),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, created_at, "
                "updated_at) SELECT %s, id, 'delivered', 0, now(), now() FROM customers WHERE id <= %s",
                (campaign, small),
            )
        conn.execute("VACUUM ANALYZE")
    return big


def add_customers(count: int, tag: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        start = conn.execute("SELECT coalesce(max(id), 0) FROM customers").fetchone()[0]
        conn.execute(
            "INSERT INTO customers (phone, location, first_name, preferred_product, created_at, updated_at) "
            "SELECT '+2549' || lpad((%s + g)::text, 8, '0'), %s, 'N' || g, 'P', now(), now() "
            "FROM generate_series(1, %s) g",
            (start, tag, count),
        )


def timed_gets(web: Web, paths: list[str], stop: threading.Event | None = None, count: int = 0) -> dict:
    """Latencies (ms) of GETs of `paths` in turn on one keep-alive connection: `count` rounds, or until `stop`."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    headers = {"Authorization": "Bearer bench-key"}
    latencies: dict[str, list[float]] = {path: [] for path in paths}
    rounds = 0
    while (stop is not None and not stop.is_set()) or rounds < count:
        for path in paths:
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            latencies[path].append((time.perf_counter() - start) * 1000)
            assert response.status == 200, response.status
        rounds += 1
    conn.close()
    return latencies


def stats_sql(campaign_ids: list[int]) -> str:
    """The statement the API runs for these campaigns' stats, compiled from the same code, ids inlined."""
    os.environ.setdefault("DATABASE_URL", DATABASE_URL)
    from sqlalchemy.dialects import postgresql

    from app import create_app
    from app.messaging.stats import counts_query

    app = create_app(
        overrides={"SQLALCHEMY_DATABASE_URI": DATABASE_URL.replace("postgresql://", "postgresql+psycopg://")}
    )
    with app.app_context():
        query = counts_query(campaign_ids)
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def timed_sql(statements: dict[str, str], stop: threading.Event, backlog: list[int]) -> dict:
    """Latencies (ms) of each statement in the database, in turn until `stop`; also samples how many count
    changes wait to be folded into `backlog`."""
    latencies: dict[str, list[float]] = {label: [] for label in statements}
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        while not stop.is_set():
            for label, sql in statements.items():
                start = time.perf_counter()
                conn.execute(sql).fetchall()
                latencies[label].append((time.perf_counter() - start) * 1000)
            backlog.append(conn.execute("SELECT count(*) FROM campaign_message_count_changes").fetchone()[0])
            time.sleep(0.01)
    return latencies


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p = lambda q: values[min(len(values) - 1, int(len(values) * q))]  # noqa: E731
    return f"{len(values)} | {statistics.median(values):.1f} | {p(0.95):.1f} | {p(0.99):.1f} | {values[-1]:.1f}"


def sent_count(campaign_id: int) -> int:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM outbound_messages WHERE campaign_id = %s AND status = 'sent'", (campaign_id,)
        ).fetchone()[0]


def start_workers(bench: Bench, count: int, burst: bool) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "worker.py", *(["--burst"] if burst else [])],
            cwd=ROOT,
            env=bench.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def queue_sends(bench: Bench, campaign_id: int, tag: str, count: int) -> None:
    """`POST /campaigns/{id}/send` to the customers tagged `tag`, and wait until their `count` send jobs are
    in Redis."""
    with bench.fan_out_worker():
        bench.request("POST", f"/campaigns/{campaign_id}/send", {"audience": {"location": tag}})
        bench.wait_for_jobs(count)


def drain_rate(bench: Bench, web: Web, size: int, triggers: bool, run: int) -> float:
    """Messages per second one worker drains from `size` queued sends, with the count triggers on or off."""
    tag = f"drain{run}"
    add_customers(size, tag)
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        for trigger in TRIGGERS:
            conn.execute(f"ALTER TABLE outbound_messages {'ENABLE' if triggers else 'DISABLE'} TRIGGER {trigger}")
    body = {"name": tag, "channel": "sms", "base_template": "Hi {first_name}", "respect_quiet_hours": False}
    campaign = bench.request("POST", "/campaigns", body)
    queue_sends(bench, campaign["id"], tag, size)
    start = time.perf_counter()
    (worker,) = start_workers(bench, 1, burst=True)
    worker.wait()
    seconds = time.perf_counter() - start
    done = sent_count(campaign["id"])
    assert done == size, (done, size)
    return size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages of the big campaign")
    parser.add_argument("--small", type=int, default=100, help="messages of each of the 99 other campaigns")
    parser.add_argument("--sends", type=int, default=20_000, help="messages sent while the reads are timed")
    parser.add_argument("--receipts", type=int, default=20_000, help="receipts posted meanwhile")
    parser.add_argument("--drain", type=int, default=5_000, help="messages per drain run, triggers on and off")
    parser.add_argument("--samples", type=int, default=200, help="quiet GETs of each path")
    args = parser.parse_args()
    bench = Bench(drain_cap=0)
    bench.reset()
    log(f"building a campaign of {args.messages:,} messages and 99 of {args.small}")
    big = build(args.messages, args.small)
    sids = store_messages(args.receipts, "twilio", "receipts")
    add_customers(args.sends, "rest")
    env = {
        **bench.env,
        "TWILIO_ACCOUNT_SID": TWILIO_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_FROM": "+15005550006",
        "SMS_PROVIDER": "twilio",  # the web checks Twilio's signatures; the workers send with the mock
    }
    web = Web(env, threads=None, public_base_url=True)
    bench.port = web.port
    paths = [f"/campaigns/{big}", "/campaigns?page_size=100"]
    rows, drains = [], []
    try:
        queue_sends(bench, big, "rest", args.sends)
        quiet = timed_gets(web, paths, count=args.samples)
        for path in paths:
            rows.append(("quiet", f"`GET {path}`", percentiles(quiet[path])))

        log("timing reads while two workers send and receipts are posted")
        requests = twilio_requests(web.base_url, sids)
        stop = threading.Event()
        loaded: dict = {}
        in_database: dict = {}
        backlog: list[int] = []
        statements = {
            f"stats of campaign {big} (SQL)": stats_sql([big]),
            "stats of the 100 campaigns (SQL)": stats_sql(list(range(big, big + 100))),
        }
        reader = threading.Thread(target=lambda: loaded.update(timed_gets(web, paths, stop=stop)))
        sql_reader = threading.Thread(target=lambda: in_database.update(timed_sql(statements, stop, backlog)))
        started = time.perf_counter()
        workers = start_workers(bench, 2, burst=True)
        reader.start()
        sql_reader.start()
        receipt_seconds, _, failures = post_all(web.port, requests, 32)
        for worker in workers:
            worker.wait()
        send_seconds = time.perf_counter() - started
        stop.set()
        reader.join()
        sql_reader.join()
        for path in paths:
            rows.append(("under load", f"`GET {path}`", percentiles(loaded[path])))
        for label, latencies in in_database.items():
            rows.append(("under load", label, percentiles(latencies)))
        load = (
            f"{args.sends:,} sends in {send_seconds:.1f} s ({args.sends / send_seconds:.0f}/s, two workers) and "
            f"{args.receipts:,} receipts in {receipt_seconds:.1f} s ({args.receipts / receipt_seconds:.0f}/s, "
            f"{len(failures)} not 200); count changes waiting to be folded: at most {max(backlog, default=0):,}, "
            f"median {statistics.median(backlog or [0]):,.0f}"
        )
        final = bench.request("GET", f"/campaigns/{big}")
        assert final["status"] == "sent", final["status"]
        assert final["stats"]["total"] == args.messages + args.sends, final["stats"]

        log("drain rates with the count triggers on and off")
        for run, triggers in enumerate((True, False, True, False)):
            drains.append((triggers, drain_rate(bench, web, args.drain, triggers, run)))
    finally:
        web.stop()

    print(f"The big campaign: {args.messages:,} messages; 100 campaigns in all. Under load: {load}.\n")
    print("| phase | read | requests | median ms | p95 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for phase, path, figures in rows:
        print(f"| {phase} | {path} | {figures} |")
    on = [rate for triggers, rate in drains if triggers]
    off = [rate for triggers, rate in drains if not triggers]
    print(f"\nOne worker draining {args.drain:,} sends (mock provider), alternated:\n")
    print("| count triggers | runs (messages/s) | best | change |")
    print("| --- | --- | --- | --- |")
    print(f"| disabled | {', '.join(f'{r:.0f}' for r in off)} | {max(off):.0f} | |")
    print(f"| enabled | {', '.join(f'{r:.0f}' for r in on)} | {max(on):.0f} | {(max(on) / max(off) - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
