"""Pause and cancel of a big campaign while it sends: how fast they answer, and what reaches the provider after.

    python bench/cancel.py                       # 100,000 recipients
    python bench/cancel.py --messages 20000

It inserts the customers in one statement, sends a campaign to them through the API, lets one `worker`
process send through the mock provider (200 ms a send, logging when each request started) for a few
seconds, then pauses, resumes and finally cancels it, timing each answer. It prints, for each control, the
answer time, the provider requests that started after the answer, and (for the cancel) how long until no
message of the campaign waited any more.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DATABASE_URL, Bench, log  # noqa: E402


def started_after(log_path: Path, moment: float) -> int:
    if not log_path.exists():
        return 0
    return sum(1 for line in log_path.read_text().splitlines() if json.loads(line)["started"] > moment)


def waiting(campaign_id: int) -> int:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM outbound_messages WHERE campaign_id = %s AND status IN ('pending', 'queued')",
            (campaign_id,),
        ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Pause, resume and cancel of a sending campaign.")
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    sends = Path(tempfile.mkdtemp(prefix="cancel-")) / "sends.jsonl"
    bench = Bench(drain_cap=args.messages)
    bench.env.update({"MOCK_SENDER_LATENCY": "0.2", "MOCK_SENDER_LOG": str(sends)})
    bench.reset()
    bench.start_web()
    worker = None
    rows = []
    try:
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO customers (phone, first_name, location, created_at, updated_at) "
                "SELECT '+2547' || lpad(n::text, 8, '0'), 'First' || n, 'cancel', now(), now() "
                "FROM generate_series(1, %s) AS n",
                (args.messages,),
            )
        campaign = bench.request("POST", "/campaigns", {"name": "cancel", "channel": "sms", "base_template": "Hi"})
        bench.request("POST", f"/campaigns/{campaign['id']}/send", {"audience": {"location": "cancel"}})
        worker = subprocess.Popen(
            [sys.executable, "worker.py"], cwd=ROOT, env=bench.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(5)  # it sends
        for action in ("pause", "resume", "cancel"):
            asked = time.time()
            answer = bench.request("POST", f"/campaigns/{campaign['id']}/{action}")
            answered = time.time()
            log(f"{action}: {answered - asked:.3f} s")
            time.sleep(2)  # the sends in flight end (200 ms each)
            row = {
                "action": action,
                "answer_s": answered - asked,
                "after": started_after(sends, answered),
                "waiting": None,
                "stats": answer["stats"],
            }
            if action == "cancel":
                while waiting(campaign["id"]):
                    time.sleep(0.1)
                row["waiting"] = time.time() - asked
            rows.append(row)
            time.sleep(3)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait()
        bench.stop()
    print(f"\n{args.messages:,} recipients, one worker, a 200 ms provider:\n")
    print("| control | answer (s) | provider requests started after the answer | none waiting after (s) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        done = f"{row['waiting']:.2f}" if row["waiting"] is not None else ""
        after = "(it sends again)" if row["action"] == "resume" else row["after"]
        print(f"| {row['action']} | {row['answer_s']:.3f} | {after} | {done} |")


if __name__ == "__main__":
    main()
