"""Audiences at a million customers: `POST /audiences/count` of a three-condition filter, and a `/send` to a
100k-customer filter audience beside a `/send` to a 100k `location` audience, with and without the frequency
cap.

    python bench/audiences.py [--customers 1000000] [--runs 3] [--plans]

Builds `--customers` customers in ten locations of equal size, each with five attributes (`tier` text,
`spend` number, `vip` boolean, `last_order` date, `zone` text), and one message each of an earlier campaign,
sent one to thirty days ago (so about a fifth were messaged within the last week). Starts the Procfile's
web command with one worker process and FREQUENCY_CAP=1/7d, then measures, best and worst of `--runs`:

- the count of `location in [3 values]` and `attributes.tier eq gold` and `messaged_within 7d`;
- a send to one location (`{"location": ...}`) and to one location as a filter, both by campaigns that
  ignore the cap, and the filter send by a campaign the cap applies to (each run a new campaign).

Prints a Markdown table; `--plans` also prints PostgreSQL's plans of the count and of the capped send's
candidates (its INSERT's SELECT, without the insert). No worker runs: the sends' first windows wait in Redis.

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench; dropped and
recreated) and BENCH_REDIS_URL (see bench/run.py; flushed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from estimate import reset_database  # noqa: E402
from run import DATABASE_URL, REDIS_URL, Bench, log  # noqa: E402
from web import Web  # noqa: E402

LOCATIONS = ("Nairobi", "Mombasa", "Kisumu", "Nakuru", "Eldoret", "Thika", "Malindi", "Kitale", "Garissa", "Kakamega")
COUNT_FILTER = {
    "all": [
        {"field": "location", "op": "in", "value": ["Nairobi", "Mombasa", "Kisumu"]},
        {"field": "attributes.tier", "op": "eq", "value": "gold"},
        {"messaged_within": "7d"},
    ]
}


def build(customers: int) -> None:
    """The customers with their attributes, and one sent message each of an earlier campaign."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        locations = "(ARRAY[" + ",".join(f"'{name}'" for name in LOCATIONS) + "])"
        conn.execute(
            "INSERT INTO customers (phone, first_name, last_name, location, preferred_product, country, attributes, "
            "created_at, updated_at) SELECT '+2547' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g, "
            f"{locations}[g %% 10 + 1], 'Product' || (g %% 50), 'KE', "
            "jsonb_build_object('tier', (ARRAY['gold','silver','bronze','basic'])[g %% 4 + 1], 'spend', g %% 1000, "
            "'vip', g %% 10 = 0, 'last_order', to_char(date '2026-01-01' + (g %% 330), 'YYYY-MM-DD'), "
            "'zone', 'zone-' || (g %% 7)), now(), now() FROM generate_series(1, %s) g",
            (customers,),
        )
        earlier = conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES ('earlier', 'sms', 'sent', 'Hi', now(), now()) RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, job_seq, sent_at, "
            "created_at, updated_at) SELECT %s, id, 'delivered', 0, 0, "
            "now() - interval '1 day' * (1 + (id / 10) %% 30) - interval '1 minute' * (id %% 1440), now(), now() "
            "FROM customers",
            (earlier,),
        )
        conn.execute("VACUUM ANALYZE")


def campaign(conn, name: str, ignore_cap: bool) -> int:
    return conn.execute(
        "INSERT INTO campaigns (name, channel, status, base_template, ignore_frequency_cap, created_at, updated_at) "
        "VALUES (%s, 'sms', 'draft', 'Hi {first_name}', %s, now(), now()) RETURNING id",
        (name, ignore_cap),
    ).fetchone()[0]


def plans(env: dict) -> list[tuple[str, str]]:
    """PostgreSQL's plans (EXPLAIN ANALYZE) of the count's statement and of the capped send's candidates, as
    the app compiles them (values inlined for EXPLAIN only)."""
    os.environ.update({k: v for k, v in env.items() if isinstance(v, str)})
    from sqlalchemy import func, select
    from sqlalchemy.dialects import postgresql

    from app import create_app
    from app.audiences import caps, filters
    from app.customers.optouts import not_opted_out
    from app.extensions import db
    from app.messaging.recipients import not_yet_messaged
    from app.models import Customer
    from config import frequency_cap

    app = create_app()
    out = []
    with app.app_context():
        matched = filters.compile_filter(COUNT_FILTER)
        cap = frequency_cap("1/7d")
        count = select(func.count()).select_from(Customer).where(matched)
        audience = filters.compile_filter({"field": "location", "op": "eq", "value": "Nakuru"})
        send = select(Customer.id).where(audience, not_opted_out("sms"), caps.not_capped(cap), not_yet_messaged(1))
        for name, stmt in (("count", count), ("the capped send's candidates", send)):
            sql = str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            with db.engine.connect() as conn:
                rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql).all()
            out.append((name, "\n".join(row[0] for row in rows)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plans", action="store_true")
    args = parser.parse_args()
    bench = Bench(drain_cap=0)
    env = {**bench.env, "WEB_CONCURRENCY": "1", "FREQUENCY_CAP": "1/7d", "SEND_STATEMENT_TIMEOUT": "120"}
    log("building the database")
    bench.redis.flushdb()
    reset_database(env)
    build(args.customers)
    per_location = args.customers // len(LOCATIONS)
    web = Web(env, None)
    rows: dict[str, list[float]] = {}
    answers: dict[str, dict] = {}
    try:
        for _ in range(args.runs):
            answer, elapsed = web.post("/audiences/count", {"filter": COUNT_FILTER})
            rows.setdefault("count: location in 3, tier eq, messaged_within 7d", []).append(elapsed)
            answers["count"] = answer
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            for run in range(args.runs):
                # Each run a new campaign per kind, and its own location: every send inserts per_location rows.
                cases = (
                    ("send: location audience (100k)", {"location": LOCATIONS[4]}, True),
                    ("send: filter audience (100k)", {"filter": _eq(LOCATIONS[5])}, True),
                    ("send: filter audience, capped", {"filter": _eq(LOCATIONS[6])}, False),
                )
                for name, audience, ignore in cases:
                    campaign_id = campaign(conn, f"{name} {run}", ignore)
                    answer, elapsed = web.post(
                        f"/campaigns/{campaign_id}/send", {"audience": audience}, expect=202, timeout=600
                    )
                    rows.setdefault(name, []).append(elapsed)
                    answers[name] = answer
    finally:
        web.stop()
        bench.redis.flushdb()
    print(
        f"Database {DATABASE_URL}, Redis {REDIS_URL}; {args.customers:,} customers with 5 attributes, "
        f"{args.customers:,} earlier messages; the Procfile's web, 1 worker process; FREQUENCY_CAP=1/7d; "
        f"{args.runs} runs.\n"
    )
    print("| request | best s | worst s | answer |")
    print("| --- | --- | --- | --- |")
    for name, times in rows.items():
        key = "count" if name.startswith("count") else name
        answer = answers[key]
        shown = (
            f"{answer['customers']:,} customers, {answer['frequency_capped']:,} capped"
            if key == "count"
            else f"{answer['messages_queued']:,} messages, {answer['skipped_frequency_cap']:,} capped"
        )
        print(f"| {name} | {min(times):.2f} | {max(times):.2f} | {shown} |")
    log(f"{per_location:,} customers per location")
    if args.plans:
        for name, plan in plans(env):
            print(f"\n{name}:\n\n```text\n{plan}\n```")


def _eq(location: str) -> dict:
    return {"field": "location", "op": "eq", "value": location}


if __name__ == "__main__":
    main()
