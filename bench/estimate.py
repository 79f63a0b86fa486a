"""The cost estimate of a send (`POST /campaigns/{id}/estimate`) at 10k and 100k recipients.

    python bench/estimate.py [--sizes 10000,100000] [--runs 3]

Builds the customers with one INSERT each size (every tenth with a curly quote in its name, so that both
encodings are counted; one in seven with a product name long enough for two segments), starts the Procfile's web command
with one worker process (`WEB_CONCURRENCY=1`: every request lands in the process measured), and asks for the
estimate of an SMS campaign to each size's audience. Prints a Markdown table: the best and the worst time
of `--runs` requests, and the web process's resident memory before the first request and at its peak
during them (sampled every 10 ms).

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench; dropped and
recreated). Redis is not touched (BENCH_REDIS_URL is only handed to the web process).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DATABASE_URL, REDIS_URL, ROOT, Bench, log  # noqa: E402
from web import Web  # noqa: E402

TEMPLATE = "Hi {first_name}, {preferred_product} is on offer in {location} this week. Reply STOP to opt out."


def reset_database(env: dict) -> None:
    name = DATABASE_URL.rsplit("/", 1)[1]
    with psycopg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    upgrade = [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"]
    subprocess.run(upgrade, cwd=ROOT, env=env, check=True, capture_output=True)


def build(sizes: list[int]) -> int:
    """Customers in one location per size (`size-N`), and the SMS campaign; returns its id."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        first = 0
        for size in sizes:
            conn.execute(
                "INSERT INTO customers (phone, first_name, last_name, location, preferred_product, created_at, "
                "updated_at) SELECT '+2547' || lpad(g::text, 8, '0'), "
                "CASE WHEN g %% 10 = 0 THEN 'Zoë’s ' || g ELSE 'First' || g END, 'Last' || g, %s, "
                "CASE WHEN g %% 7 = 0 THEN repeat('Sneakers ', 10) ELSE 'Product' || (g %% 50) END, now(), now() "
                "FROM generate_series(%s::int, %s::int) g",
                (f"size-{size}", first + 1, first + size),
            )
            first += size
        conn.execute("VACUUM ANALYZE customers")
        return conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES ('estimate', 'sms', 'draft', %s, now(), now()) RETURNING id",
            (TEMPLATE,),
        ).fetchone()[0]


class PeakSampler:
    """The highest resident memory of any one process of the web command, sampled in a thread."""

    def __init__(self, pid: int):
        self.master = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        return max(p.memory_info().rss for p in [self.master, *self.master.children(recursive=True)])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.current())
            except psutil.Error:
                pass
            time.sleep(0.01)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {
        **Bench(drain_cap=0).env,
        "WEB_CONCURRENCY": "1",
        "SMS_SEGMENT_PRICE": "0.8",
        "CURRENCY": "KES",
        "DATABASE_STATEMENT_TIMEOUT": "30",
    }
    log("building the database")
    reset_database(env)
    campaign_id = build(sizes)
    web = Web(env, None)
    rows = []
    try:
        sampler = PeakSampler(web.proc.pid)
        for size in sizes:
            before = sampler.current()
            times = []
            with sampler:
                for _ in range(args.runs):
                    answer, elapsed = web.post(
                        f"/campaigns/{campaign_id}/estimate", {"audience": {"location": f"size-{size}"}}
                    )
                    times.append(elapsed)
            assert answer["recipients"] == size, answer
            log(f"{size}: {answer}")
            rows.append((size, min(times), max(times), before, sampler.peak, answer))
            sampler = PeakSampler(web.proc.pid)
    finally:
        web.stop()
    print(f"Database {DATABASE_URL}, Redis {REDIS_URL}; the Procfile's web, 1 worker process; best of {args.runs}.\n")
    print("| recipients | segments | GSM-7 / UCS-2 messages | best s | worst s | RSS before (MB) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, best, worst, before, peak, answer in rows:
        split = answer["by_encoding"]
        print(
            f"| {size:,} | {answer['segments']:,} | {split['GSM-7']['messages']:,} / {split['UCS-2']['messages']:,} "
            f"| {best:.2f} | {worst:.2f} | {before / 2**20:.0f} | {peak / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
