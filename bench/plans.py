"""Query plans and timings of campaign stats and the message listing at a million messages.

    python bench/plans.py [--messages 1000000]

Builds three campaigns of that many messages each (mixed statuses) in BENCH_DATABASE_URL (recreated), runs
the exact SQL the API runs for `GET /campaigns/{id}` stats (and the count from the rows it replaced) and
`GET /campaigns/{id}/messages` by page number and by cursor, and prints a table: the index each plan uses
and the median time of five runs, in the database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from sqlalchemy.dialects import postgresql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/campaigns_bench")


def api_queries(campaign_id: int, cursor_at: int = 0) -> dict[str, str]:
    """The SQL the API issues, compiled from the same code paths, with the campaign id inlined;
    `cursor_at` is the id of the last message of page 4,999 (newest first, 20 a page)."""
    os.environ.setdefault("DATABASE_URL", DATABASE_URL)
    from sqlalchemy import func, select

    from app import create_app
    from app.extensions import db
    from app.messaging.send.store import LAST_PENDING
    from app.messaging.stats import counts_query, rows_query, waiting_quiet_hours_query
    from app.models import MessageStatus, OutboundMessage
    from app.pagination import decode_cursor, encode_cursor

    app = create_app(
        overrides={"SQLALCHEMY_DATABASE_URI": DATABASE_URL.replace("postgresql://", "postgresql+psycopg://")}
    )
    with app.app_context():
        listing = select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id)
        newest_first = listing.order_by(OutboundMessage.id.desc())
        before = decode_cursor("messages", encode_cursor("messages", cursor_at))
        queries = {
            "stats counted from the rows (GROUP BY status, before 0011)": rows_query([campaign_id]),
            "stats from the kept counts (what the API reads)": counts_query([campaign_id]),
            "stats of 100 campaigns from the kept counts (a page of the list)": counts_query(
                range(campaign_id, campaign_id + 100)
            ),
            "stats waiting_quiet_hours": waiting_quiet_hours_query([campaign_id]),
            "messages page 1": listing.order_by(OutboundMessage.id.desc()).limit(20),
            "messages cursor page 1 (20 + 1 rows)": newest_first.limit(21),
            "messages cursor page 5000": newest_first.where(OutboundMessage.id < before).limit(21),
            "messages page 1, status=failed": listing.where(OutboundMessage.status == MessageStatus.FAILED)
            .order_by(OutboundMessage.id.desc())
            .limit(20),
            "messages page 5000 (offset 99,980)": listing.order_by(OutboundMessage.id.desc()).limit(20).offset(99_980),
            "messages total (pagination count)": select(func.count()).select_from(listing.subquery()),
            "completion check (last pending message)": LAST_PENDING.params(campaign_id=campaign_id),
        }
        db.engine.dispose()
    return {
        name: str(q.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        for name, q in queries.items()
    }


def measure(conn: psycopg.Connection, label: str, sql: str) -> tuple[str, str, bool, float]:
    """(label, indexes the plan uses, whether it scans the table, median ms of five runs)."""
    plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql).fetchall())
    indexes = sorted({w for w in plan.split() if w.startswith("ix_") or w.endswith("_pkey")})
    times = []
    for _ in range(5):
        start = time.perf_counter()
        conn.execute(sql).fetchall()
        times.append((time.perf_counter() - start) * 1000)
    return label, ", ".join(indexes) or "(none)", "Seq Scan" in plan, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.messages
    name = DATABASE_URL.rsplit("/", 1)[1]
    with psycopg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "DATABASE_URL": DATABASE_URL}
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        print(f"building {n:,} customers and messages...", file=sys.stderr)
        conn.execute(
            "INSERT INTO customers (phone, first_name, created_at, updated_at) "
            "SELECT '+2547' || lpad(g::text, 8, '0'), 'C' || g, now(), now() FROM generate_series(1, %s) g",
            (n,),
        )
        conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES ('other', 'sms', 'sent', 'Hi', now(), now()), ('big', 'sms', 'sending', 'Hi', now(), now())"
        )
        for campaign_id, count in ((1, n // 10), (2, n)):
            conn.execute(
                "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, not_before, created_at, "
                "updated_at) "
                "SELECT %s, id, CASE WHEN id %% 100 = 0 THEN 'failed' WHEN id %% 10 = 0 THEN 'pending' ELSE 'sent' END,"
                # Half the pending ones wait out quiet hours.
                " 0, CASE WHEN id %% 20 = 0 AND id %% 100 <> 0 THEN now() + interval '10 hours' END, now(), now() "
                "FROM customers WHERE id <= %s",
                (campaign_id, count),
            )
        conn.execute("VACUUM ANALYZE")
        conn.execute("SELECT 1 FROM campaign_message_counts LIMIT 1")  # the triggers counted the inserts
        page_4999_last = conn.execute(
            "SELECT id FROM outbound_messages WHERE campaign_id = 2 ORDER BY id DESC OFFSET 99979 LIMIT 1"
        ).fetchone()[0]
        rows = [measure(conn, label, sql) for label, sql in api_queries(2, page_4999_last).items()]
        # A third campaign 90% through: its sent messages' old index entries are still there, as they
        # are between two vacuums while a campaign drains.
        conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES ('draining', 'sms', 'sending', 'Hi', now(), now())"
        )
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, retry_count, created_at, updated_at) "
            "SELECT 3, id, 'pending', 0, now(), now() FROM customers WHERE id <= %s",
            (n,),
        )
        conn.execute("ANALYZE outbound_messages")
        conn.execute("ALTER TABLE outbound_messages SET (autovacuum_enabled = off)")
        conn.execute(
            "UPDATE outbound_messages SET status = 'sent' WHERE campaign_id = 3 AND customer_id <= %s", (n * 9 // 10,)
        )
        for label, sql in api_queries(3, page_4999_last).items():
            if label.startswith("completion check"):
                rows.append(measure(conn, f"{label}, another campaign 90% sent", sql))
    print(f"| query ({n:,} messages in the campaign) | index used | seq scan | median ms |")
    print("| --- | --- | --- | --- |")
    for label, index, seq, ms in rows:
        print(f"| {label} | {index} | {'yes' if seq else 'no'} | {ms:.1f} |")


if __name__ == "__main__":
    main()
