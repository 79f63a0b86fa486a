"""Windows: Redis holds a window per sending campaign, not its audience (docs/architecture.md, "Windows").

    python bench/windows.py                                  # 100,000 and 1,000,000 recipients, then the fair share
    python bench/windows.py --sizes 100000 --drain-cap 5000 --no-fair-share

It runs a redis-server of its own (on a free port, nothing persisted), so that Redis's `used_memory`
counts only what the service puts there, and the Procfile's web command (one gunicorn process) and
`python worker.py` processes against it and BENCH_DATABASE_URL (dropped and created again; the mock
sender, no latency). For each size it inserts the customers in one SQL statement, then:
- sends one campaign to all of them (`POST /campaigns/{id}/send` with an audience), no send worker
  running: the answer's time and the web process's CPU for it (the request adds the first
  `RECIPIENT_BATCH` recipients), then a control-queue worker adds the rest: seconds from the request until
  every recipient is added, and that worker's CPU per 1,000; beside them PostgreSQL's `INSERT ... SELECT`
  of as many rows alone, in one statement; Redis's used memory above idle (the server restarted empty
  before each size) and the jobs queued for the campaign, once every recipient is added;
- drains it with one worker: messages/s and the worker's CPU per message over at most `--drain-cap`
  messages, and Redis's peak memory above idle meanwhile (finished jobs linger `JOB_RESULT_TTL`);
- RQ's own `SimpleWorker` on as many no-op jobs, queued with the send jobs' RQ options, in the same
  run: jobs/s and CPU per job (the floor, and the ratio the issue sets at 0.75x or more).
Then the fair share, one worker process each, timed through the mock sender's log:
- a 10-message campaign sent while a 20,000-message one sends: seconds from its request to `sent`;
- two equal campaigns (`--equal` each) sent together: when each finished, from the first send;
- a `high` and a `normal` campaign sending together: each one's share of `--shares` sends;
- a 20,000-message campaign canceled while it sends: its jobs in Redis before the cancel and when the
  cancel answers, and seconds from the next campaign's send request to its first send.
Prints Markdown tables.

Settings: BENCH_DATABASE_URL (see bench/run.py). BENCH_REDIS_URL is not used: Redis is the bench's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import psycopg
from rq import Queue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from run import DATABASE_URL, NOOP_QUEUE, QUEUE, Bench, Peak, log, noop_job  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

WINDOW = 500  # SEND_WINDOW's default: the bench runs with it
RECIPIENT_BATCH = 10_000  # RECIPIENT_BATCH's default: the request adds this many, a job the rest


class Windows(Bench):
    def __init__(self, drain_cap: int, redis: RedisServer):
        super().__init__(drain_cap)
        self.server = redis
        self.redis = redis.client()
        self.env["REDIS_URL"] = redis.url
        self.next_customer = 1

    # -- data -----------------------------------------------------------------------------------------
    def add_customers(self, count: int, location: str) -> float:
        """`count` customers in `location`, in one INSERT ... SELECT; returns its seconds."""
        first = self.next_customer
        self.next_customer += count
        start = time.perf_counter()
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO customers (phone, first_name, last_name, location, preferred_product, created_at, "
                "updated_at) SELECT '+2547' || lpad(g::text, 8, '0'), 'First' || g, 'Last' || g, %s, "
                "'Product' || (g %% 50), now(), now() FROM generate_series(%s::int, %s::int) AS g",
                (location, first, first + count - 1),
            )
            conn.execute("ANALYZE customers")
        return time.perf_counter() - start

    def campaign(self, name: str, **fields) -> int:
        body = {"name": name, "channel": "sms", "base_template": "Hi {first_name}, {preferred_product}", **fields}
        return self.request("POST", "/campaigns", body)["id"]

    def detail(self, campaign_id: int) -> dict:
        return self.request("GET", f"/campaigns/{campaign_id}")

    def stop_campaign(self, campaign_id: int) -> None:
        """Leave a measured campaign out of what follows: canceled in its row only (its messages stay as they
        are), so that no later worker sends it and no cancel job costs a later measurement."""
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute("UPDATE campaigns SET status = 'canceled' WHERE id = %s", (campaign_id,))
        Queue(QUEUE, connection=self.redis).empty()

    def restart_redis(self) -> int:
        """Restart the bench's redis-server empty; returns its used memory once the web process has used it
        again (one request: its connection and its rate-limit key)."""
        self.server.stop()
        self.server.start()
        self.redis = self.server.client()
        self.request("GET", "/campaigns?page_size=1")
        return self.used_memory()

    def used_memory(self) -> int:
        return self.redis.info("memory")["used_memory"]

    def worker(self, **env) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "worker.py"],
            cwd=ROOT,
            env={**self.env, **{k: str(v) for k, v in env.items()}},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # -- one size ---------------------------------------------------------------------------------------
    def run_size(self, size: int) -> dict:
        tag = f"size-{size}"
        log(f"{size}: insert the customers")
        inserted = self.add_customers(size, tag)
        idle = self.restart_redis()
        campaign_id = self.campaign(tag)
        web = Peak(self.web.pid)
        cpu_before = web.cpu()
        log(f"{size}: send")
        start = time.perf_counter()
        answer = self.request("POST", f"/campaigns/{campaign_id}/send", {"audience": {"location": tag}})
        answered = time.perf_counter() - start
        send_cpu = web.cpu() - cpu_before
        assert answer["messages_queued"] == min(size, RECIPIENT_BATCH), answer
        self.wait_for_jobs(min(size, WINDOW))
        log(f"{size}: add the rest of the recipients (a control-queue worker only)")
        adder = self.worker(QUEUES="campaign_control")
        adder_tree = Peak(adder.pid)
        while self.detail(campaign_id)["last_send"]["adding"]:
            time.sleep(0.05)
        added = time.perf_counter() - start
        adder_cpu = adder_tree.cpu()
        adder.terminate()
        adder.wait()
        assert self.detail(campaign_id)["stats"]["total"] == size
        time.sleep(2)  # sends stopped: nothing else moves
        queued = Queue(QUEUE, connection=self.redis).count
        stopped_mb = (self.used_memory() - idle) / 2**20
        floor_insert = self.floor_insert_once(tag)

        log(f"{size}: drain with 1 worker")
        peak = {"bytes": 0}
        done = threading.Event()

        def sample_redis() -> None:
            while not done.is_set():
                peak["bytes"] = max(peak["bytes"], self.used_memory())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample_redis)
        sampler.start()
        try:
            drain, worker_mb, cpu_ms = self.drain(campaign_id, 1, size)
        finally:
            done.set()
            sampler.join()
        self.stop_campaign(campaign_id)
        log(f"{size}: RQ's SimpleWorker on no-op jobs")
        noop, noop_cpu_ms = self.floor_simple_worker(min(size, self.drain_cap))
        return {
            "size": size,
            "insert_customers_s": inserted,
            "answer_s": answered,
            "answer_cpu_ms": send_cpu * 1000,
            "added_s": added,
            "adder_cpu_ms": adder_cpu * 1000 / size * 1000,
            "floor_insert_s": floor_insert,
            "queued": queued,
            "stopped_mb": stopped_mb,
            "draining_mb": (peak["bytes"] - idle) / 2**20,
            "drain": drain,
            "cpu_ms": cpu_ms,
            "worker_mb": worker_mb,
            "noop": noop,
            "noop_cpu_ms": noop_cpu_ms,
        }

    def floor_insert_once(self, tag: str) -> float:
        """The send's INSERT ... SELECT alone, into an empty copy of the table (its indexes too, not its
        count triggers), once: at a million rows one run is long enough."""
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_floor (LIKE outbound_messages INCLUDING ALL)")
            start = time.perf_counter()
            conn.execute(
                "INSERT INTO bench_floor (campaign_id, customer_id, status, retry_count, job_seq, created_at, "
                "updated_at) SELECT 1, id, 'pending', 0, 0, now(), now() FROM customers WHERE location = %s",
                (tag,),
            )
            elapsed = time.perf_counter() - start
            conn.execute("DROP TABLE bench_floor")
        return elapsed

    def floor_simple_worker(self, count: int) -> tuple[float, float]:
        """RQ's own SimpleWorker on `count` no-op jobs (the send jobs' RQ options) on the bench's Redis:
        jobs/s and CPU ms per job, from its first job on."""
        queue = Queue(NOOP_QUEUE, connection=self.redis)
        queue.empty()
        for offset in range(0, count, 1000):
            batch = [noop_job() for _ in range(min(1000, count - offset))]
            with self.redis.pipeline() as pipe:
                queue.enqueue_many(batch, pipeline=pipe)
                pipe.execute()
        cmd = [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", self.server.url]
        cmd += ["-w", "rq.worker.SimpleWorker", "--logging_level", "WARNING", NOOP_QUEUE]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tree = Peak(proc.pid)
        first = last = None
        while proc.poll() is None:
            done = count - queue.count
            if first is None and done > 0:
                first = (time.perf_counter(), done, tree.cpu())
            elif first is not None:
                last = (time.perf_counter(), done, tree.cpu())
            time.sleep(0.05)
        now, done, cpu = last
        return (done - first[1]) / (now - first[0]), (cpu - first[2]) * 1000 / max(1, done - first[1])

    # -- the fair share ---------------------------------------------------------------------------------
    def sends(self, log_path: Path) -> list[dict]:
        if not log_path.exists():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines()]

    def wait(self, predicate, timeout: float, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not within {timeout} s")
            time.sleep(interval)

    def ended_at(self, campaign_id: int) -> float:
        return datetime.fromisoformat(self.detail(campaign_id)["updated_at"]).timestamp()

    def fair_share(self, equal: int, shares: int, directory: Path) -> dict:
        figures = {}
        for location, count in (("big", 20_000), ("small", 10), ("east", equal), ("west", equal)):
            self.add_customers(count, location)
        for location, count in (("high", 2 * shares), ("normal", 2 * shares), ("next", 10)):
            self.add_customers(count, location)

        log("fair share: 10 messages beside 20,000")
        sent_log = directory / "small.jsonl"
        big = self.campaign("big")
        self.request("POST", f"/campaigns/{big}/send", {"audience": {"location": "big"}})
        worker = self.worker(MOCK_SENDER_LOG=sent_log)
        self.wait(lambda: len(self.sends(sent_log)) >= 1000, 120)
        small = self.campaign("small")
        requested = time.time()
        self.request("POST", f"/campaigns/{small}/send", {"audience": {"location": "small"}})
        self.wait(lambda: self.detail(small)["status"] == "sent", 300)
        figures["small_s"] = time.time() - requested
        figures["big_sent_then"] = self.detail(big)["stats"]["sent"]
        worker.terminate()
        worker.wait()
        self.stop_campaign(big)

        log(f"fair share: two campaigns of {equal} sent together")
        sent_log = directory / "equal.jsonl"
        pair = [self.campaign(location) for location in ("east", "west")]
        for campaign_id, location in zip(pair, ("east", "west"), strict=True):
            self.request("POST", f"/campaigns/{campaign_id}/send", {"audience": {"location": location}})
        worker = self.worker(MOCK_SENDER_LOG=sent_log)
        self.wait(lambda: all(self.detail(c)["status"] == "sent" for c in pair), 600, interval=0.5)
        began = min(line["started"] for line in self.sends(sent_log))
        figures["equal_s"] = [self.ended_at(c) - began for c in pair]
        worker.terminate()
        worker.wait()

        log("fair share: high beside normal")
        sent_log = directory / "priority.jsonl"
        normal = self.campaign("normal", priority="normal")
        high = self.campaign("high", priority="high")
        self.request("POST", f"/campaigns/{normal}/send", {"audience": {"location": "normal"}})
        self.request("POST", f"/campaigns/{high}/send", {"audience": {"location": "high"}})
        worker = self.worker(MOCK_SENDER_LOG=sent_log)
        # Shares from the end of the first turn of the line (1,500 jobs: both windows) over the next sends,
        # while both still send.
        self.wait(lambda: len(self.sends(sent_log)) >= 1500 + shares, 600, interval=0.5)
        lines = sorted(self.sends(sent_log), key=lambda line: line["started"])[1500 : 1500 + shares]
        counted = Counter(line["campaign_id"] for line in lines)
        figures["shares"] = (counted[high], counted[normal])
        worker.terminate()
        worker.wait()
        for campaign_id in (normal, high):
            self.stop_campaign(campaign_id)

        log("a big campaign canceled, then the next one")
        sent_log = directory / "cancel.jsonl"
        big = self.campaign("big again")
        self.request("POST", f"/campaigns/{big}/send", {"audience": {"location": "big"}})
        worker = self.worker(MOCK_SENDER_LOG=sent_log)
        self.wait(lambda: len(self.sends(sent_log)) >= 1000, 120)
        figures["queued_at_cancel"] = Queue(QUEUE, connection=self.redis).count
        self.request("POST", f"/campaigns/{big}/cancel")
        figures["left_by_cancel"] = Queue(QUEUE, connection=self.redis).count
        following = self.campaign("next")
        requested = time.time()
        self.request("POST", f"/campaigns/{following}/send", {"audience": {"location": "next"}})
        self.wait(lambda: any(line["campaign_id"] == following for line in self.sends(sent_log)), 300)
        first = min(line["started"] for line in self.sends(sent_log) if line["campaign_id"] == following)
        figures["next_first_send_s"] = first - requested
        worker.terminate()
        worker.wait()
        return figures


def size_table(results: list[dict]) -> str:
    rows = [
        ("insert the customers, one SQL statement (s)", "insert_customers_s", "{:.1f}"),
        ("`/send` answer (s)", "answer_s", "{:.2f}"),
        ("web process CPU for the send (ms)", "answer_cpu_ms", "{:.0f}"),
        ("every recipient added, from the request (s)", "added_s", "{:.2f}"),
        ("control worker CPU to add them, per 1,000 recipients (ms)", "adder_cpu_ms", "{:.1f}"),
        ("PG INSERT ... SELECT of as many rows alone, in one statement (s)", "floor_insert_s", "{:.2f}"),
        ("send jobs in Redis for the campaign, sends stopped", "queued", "{:,}"),
        ("Redis used memory above idle, sends stopped (MB)", "stopped_mb", "{:.2f}"),
        ("Redis used memory above idle, peak while 1 worker drains (MB)", "draining_mb", "{:.2f}"),
        ("drain, 1 worker (msg/s)", "drain", "{:.0f}"),
        ("worker CPU per message (ms)", "cpu_ms", "{:.2f}"),
        ("RQ SimpleWorker, no-op jobs (jobs/s)", "noop", "{:.0f}"),
        ("SimpleWorker CPU per job (ms)", "noop_cpu_ms", "{:.2f}"),
        ("worker peak RSS (MB)", "worker_mb", "{:.0f}"),
    ]
    lines = ["| measure | " + " | ".join(f"{r['size']:,}" for r in results) + " |"]
    lines.append("|" + " --- |" * (1 + len(results)))
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results) + " |")
    ratios = " | ".join(f"{r['drain'] / r['noop']:.2f}x" for r in results)
    lines.append(f"| drain / SimpleWorker no-op | {ratios} |")
    answers = " | ".join(f"{r['answer_s'] / r['floor_insert_s']:.2f}x" for r in results)
    lines.append(f"| `/send` answer / INSERT ... SELECT alone | {answers} |")
    if len(results) > 1:
        small, big = results[0], results[-1]
        lines.append("")
        lines.append(
            f"{big['size'] // small['size']}x the recipients: Redis memory above idle (sends stopped) "
            f"{big['stopped_mb'] / small['stopped_mb']:.2f}x, "
            f"send jobs in Redis {big['queued'] / small['queued']:.2f}x, "
            f"`/send` answer {big['answer_s'] / small['answer_s']:.1f}x."
        )
    return "\n".join(lines)


def fair_table(figures: dict, equal: int, shares: int) -> str:
    east, west = figures["equal_s"]
    high, normal = figures["shares"]
    rows = [
        (
            "10-message campaign sent while a 20,000-message one sends: request to `sent` (s)",
            f"{figures['small_s']:.1f} (the big one had sent {figures['big_sent_then']:,})",
        ),
        (
            f"two campaigns of {equal:,} sent together: each finished after (s)",
            f"{east:.1f} and {west:.1f} ({abs(east - west) / max(east, west):.1%} apart)",
        ),
        (
            f"`high` beside `normal`: sends of each over {shares:,}, after the first 1,500",
            f"{high:,} and {normal:,} ({high / max(1, normal):.2f}x)",
        ),
        (
            "20,000-message campaign canceled while sending: its jobs in Redis before the cancel, and when it answered",
            f"{figures['queued_at_cancel']:,} and {figures['left_by_cancel']:,}",
        ),
        ("then the next campaign: its send request to its first send (s)", f"{figures['next_first_send_s']:.1f}"),
    ]
    lines = ["| fair share (1 worker, default SEND_WINDOW) | measured |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Send windows: memory, drain and fair share; Markdown tables.")
    parser.add_argument("--sizes", default="100000,1000000", help="recipient counts, comma-separated")
    parser.add_argument("--drain-cap", type=int, default=10000, help="most messages drained per measurement")
    parser.add_argument("--equal", type=int, default=5000, help="messages of each of the two equal campaigns")
    parser.add_argument("--shares", type=int, default=6000, help="sends over which high and normal are counted")
    parser.add_argument("--no-fair-share", action="store_true", help="only the sizes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        bench = Windows(args.drain_cap, server)
        try:
            bench.reset()
            bench.start_web()
            results = [bench.run_size(int(s)) for s in args.sizes.split(",")]
            fair = None if args.no_fair_share else bench.fair_share(args.equal, args.shares, Path(directory))
        finally:
            bench.stop()
            server.stop()
    print(size_table(results))
    if fair:
        print()
        print(fair_table(fair, args.equal, args.shares))


if __name__ == "__main__":
    main()
