"""The CSV export of a campaign's messages (`GET /campaigns/{id}/messages.csv`) at 1M messages.

    python bench/export.py [--messages 1000000] [--runs 2]

Builds the customers and one campaign's messages with one INSERT each (every tenth message failed, with an
error holding a comma and quotes), starts the Procfile's web command with one worker process
(`WEB_CONCURRENCY=1`: every request lands in the process measured), and downloads the export `--runs`
times, reading it as it comes in 64 KB reads and counting its lines. Prints a Markdown table: the time to the
first byte and to the last, rows a second, megabytes, and the web process's resident memory before the first
download and at its peak during them (sampled every 10 ms).

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench; dropped and
recreated). Redis is not touched (BENCH_REDIS_URL is only handed to the web process).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from estimate import PeakSampler, reset_database  # noqa: E402
from run import DATABASE_URL, REDIS_URL, Bench, log  # noqa: E402
from web import Web  # noqa: E402


def build(messages: int) -> int:
    """`messages` customers and one sent campaign with a message to each; returns the campaign's id."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (phone, first_name, last_name, location, preferred_product, created_at, "
            "updated_at) SELECT '+2547' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g, 'Nairobi', "
            "'Product' || (g %% 50), now(), now() FROM generate_series(1, %s) g",
            (messages,),
        )
        campaign_id = conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES ('export', 'sms', 'sent', 'Hi {first_name}', now(), now()) RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, provider, "
            "provider_message_id, error_code, last_error, created_at, updated_at, read_at) "
            "SELECT %s, id, CASE WHEN id %% 10 = 0 THEN 'failed' ELSE 'delivered' END, id %% 4, 'mock', "
            "'mock-' || id, CASE WHEN id %% 10 = 0 THEN '21211' END, "
            "CASE WHEN id %% 10 = 0 THEN 'Invalid ''To'' number, \"' || phone || '\"' END, "
            "now() - interval '1 hour', now(), CASE WHEN id %% 3 = 0 THEN now() END FROM customers",
            (campaign_id,),
        )
        conn.execute("VACUUM ANALYZE customers")
        conn.execute("VACUUM ANALYZE outbound_messages")
        return campaign_id


def download(web: Web, path: str) -> tuple[int, int, float, float]:
    """(lines, bytes, seconds to the first byte, seconds to the last) of one GET, read as it comes."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=300)
    start = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": "Bearer bench-key"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {response.read()[:500]!r}")
    first = None
    lines = size = 0
    while block := response.read1(64 * 1024):
        first = first or time.perf_counter() - start
        lines += block.count(b"\n")
        size += len(block)
    elapsed = time.perf_counter() - start
    conn.close()
    return lines, size, first or elapsed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    env = {**Bench(drain_cap=0).env, "WEB_CONCURRENCY": "1"}
    log("building the database")
    reset_database(env)
    campaign_id = build(args.messages)
    web = Web(env, None)
    rows = []
    try:
        sampler = PeakSampler(web.proc.pid)
        before = sampler.current()
        with sampler:
            for query, expected in (("", args.messages), ("?status=failed", args.messages // 10)):
                for _ in range(args.runs):
                    lines, size, first, elapsed = download(web, f"/campaigns/{campaign_id}/messages.csv{query}")
                    assert lines - 1 == expected, (lines, expected)
                    log(f"{query or 'all'}: {expected:,} rows, {size / 2**20:.0f} MB in {elapsed:.2f} s")
                    rows.append((query or "(all)", expected, size, first, elapsed))
        peak = sampler.peak
    finally:
        web.stop()
    print(f"Database {DATABASE_URL}, Redis {REDIS_URL}; the Procfile's web, 1 worker process.\n")
    print(f"Web process RSS: {before / 2**20:.0f} MB before the first download, {peak / 2**20:.0f} MB at its peak.\n")
    print("| filter | rows | MB | first byte s | total s | rows/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for query, count, size, first, elapsed in rows:
        print(f"| `{query}` | {count:,} | {size / 2**20:.0f} | {first:.2f} | {elapsed:.2f} | {count / elapsed:,.0f} |")


if __name__ == "__main__":
    main()
