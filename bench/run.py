"""End-to-end benchmark against real PostgreSQL and Redis, with the Procfile's web and worker processes.

    python bench/run.py                       # 10k and 100k recipients
    python bench/run.py --sizes 10000 --drain-cap 5000

For each size it imports the customers through `POST /customers/import`, sends a campaign to them
with an audience (`POST /campaigns/{id}/send`), waits until the campaign's first window of jobs
(`SEND_WINDOW`) is in Redis, then drains the campaign with 1 and with 2 `python worker.py` processes,
which refill the window from PostgreSQL as sends end; a third campaign is taken to its last tenth and
drained to the end by one worker. Beside each figure it measures the floor on the same machine in the
same run: PostgreSQL `INSERT ... SELECT` of as many rows, RQ `enqueue_many` of a window of no-op jobs, and
the drain rate of RQ's own `SimpleWorker` (and of its forking `Worker`, and of this service's worker)
on no-op jobs, enqueued with the same RQ options as send jobs. Send timings are the best of the three
sends. Drain rates are measured over at most `--drain-cap` messages per run (steady state), counted
in Redis.

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench; dropped
and recreated) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/12; flushed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
from redis import Redis
from rq import Queue, Retry

ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/campaigns_bench")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
QUEUE = "campaign_sends"
CONTROL_QUEUE = "campaign_control"
NOOP_QUEUE = "bench_noop"


def noop_job():
    """A no-op job enqueued with the same options as a send job: the floor differs only in the job body."""
    return Queue.prepare_data(
        "builtins.len", args=("",), result_ttl=10, timeout=60, retry=Retry(max=3, interval=[10, 30, 60])
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peak:
    """Peak resident memory of a process and its children, and their CPU time, sampled while `sample()`
    (or `cpu()`) is called."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self.seen: dict[int, float] = {}  # CPU seconds of each process of the tree, as last read

    def sample(self) -> None:
        try:
            procs = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    times = proc.cpu_times()
                    self.seen[proc.pid] = times.user + times.system
            except psutil.Error:
                continue

    def cpu(self) -> float:
        """CPU seconds the tree has spent so far (read now)."""
        self.sample()
        return sum(self.seen.values())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


class Bench:
    def __init__(self, drain_cap: int):
        self.drain_cap = drain_cap
        self.next_phone = 10_000_000  # each size imports its own range of numbers
        self.env = {
            **os.environ,
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "LOG_LEVEL": "WARNING",
            "API_KEYS": "bench-key",
            "API_RATE_LIMIT": "1000000 per minute",
        }
        self.redis = Redis.from_url(REDIS_URL)
        self.port = free_port()
        self.web: subprocess.Popen | None = None
        self.web_peak: Peak | None = None

    # -- setup -------------------------------------------------------------------------------
    def reset(self) -> None:
        name = DATABASE_URL.rsplit("/", 1)[1]
        admin = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.redis.flushdb()
        subprocess.run(
            [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )

    def start_web(self) -> None:
        # As the Procfile's web process, with one gunicorn worker so its memory is one process's.
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "wsgi:app",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--timeout",
            "120",
        ]
        self.web = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.web_peak = Peak(self.web.pid)
        for _ in range(100):
            try:
                self.request("GET", "/campaigns?page_size=1")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("web process did not start")

    def stop(self) -> None:
        if self.web and self.web.poll() is None:
            self.web.terminate()
            self.web.wait()

    def request(self, method: str, path: str, body=None, content_type="application/json", stream_from=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        headers = {"Authorization": "Bearer bench-key", "Content-Type": content_type}
        if stream_from is not None:
            headers["Content-Length"] = str(os.path.getsize(stream_from))
            with open(stream_from, "rb") as f:
                conn.request(method, path, body=f, headers=headers)
        else:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        payload = json.loads(response.read() or b"null")
        conn.close()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {payload}")
        return payload

    # -- the service ---------------------------------------------------------------------------
    def import_customers(self, size: int, tag: str) -> float:
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
            f.write("phone,first_name,last_name,location,preferred_product\n")
            base = self.next_phone
            self.next_phone += size
            for n in range(size):
                f.write(f"+2547{base + n:08d},First{n},Last{n},{tag},Product{n % 50}\n")
            path = f.name
        start = time.perf_counter()
        report = self.request("POST", "/customers/import", content_type="text/csv", stream_from=path)
        elapsed = time.perf_counter() - start
        os.unlink(path)
        assert report["created"] == size, report
        return elapsed

    def send(self, tag: str) -> tuple[int, float, float]:
        """Create a campaign, send it to the tag's customers; returns (id, answer s, first window in Redis s)."""
        campaign = self.request(
            "POST",
            "/campaigns",
            {"name": f"bench {tag}", "channel": "sms", "base_template": "Hi {first_name}, {preferred_product}"},
        )
        start = time.perf_counter()
        answer = self.request("POST", f"/campaigns/{campaign['id']}/send", {"audience": {"location": tag}})
        answered = time.perf_counter() - start
        self.wait_for_jobs(min(answer["messages_queued"], self.window), sample=self.web_peak.sample)
        in_redis = time.perf_counter() - start
        return campaign["id"], answered, in_redis

    @property
    def window(self) -> int:
        """The send window of the workers and the web (SEND_WINDOW, as the bench sets it or by default)."""
        return int(self.env.get("SEND_WINDOW", "500"))

    def wait_for_jobs(self, count: int, sample=None) -> None:
        """Wait until `count` send jobs are in Redis (calling `sample` while it waits)."""
        queue = Queue(QUEUE, connection=self.redis)
        while queue.count < count:
            if sample:
                sample()
            time.sleep(0.01)

    def sent(self, campaign_id: int) -> int:
        """The campaign's messages a provider took, from the counts PostgreSQL keeps (a few rows, however many
        messages: polling it does not load the database the workers use)."""
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            return conn.execute(
                "SELECT coalesce(sum(messages), 0)::bigint FROM (SELECT messages FROM campaign_message_counts "
                "WHERE campaign_id = %s AND status IN ('sent', 'delivered', 'undelivered') UNION ALL "
                "SELECT messages FROM campaign_message_count_changes "
                "WHERE campaign_id = %s AND status IN ('sent', 'delivered', 'undelivered')) AS counted",
                (campaign_id, campaign_id),
            ).fetchone()[0]

    def drain(
        self, campaign_id: int, workers: int, total: int, env: dict | None = None, then=None
    ) -> tuple[float, float, float]:
        """Start `workers` worker processes on the campaign; returns (messages/s over the measured window,
        peak MB, worker CPU ms per message over it). `then`, if given, is called once the measured messages
        are sent, before the workers are stopped."""
        target = min(total, self.drain_cap)
        procs = [
            subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        peaks = [Peak(p.pid) for p in procs]
        before = self.sent(campaign_id)
        first = None
        while True:
            for p in peaks:
                p.sample()
            done = self.sent(campaign_id) - before
            now = time.perf_counter()
            if first is None and done > 0:
                first = (now, done, sum(p.cpu() for p in peaks))  # from the first send: start-up is not drain
            if done >= target:
                break
            time.sleep(0.1)
        cpu = sum(p.cpu() for p in peaks) - first[2]
        rate = (done - first[1]) / (now - first[0])
        if then:
            then()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        Queue(QUEUE, connection=self.redis).empty()
        return rate, max(p.mb for p in peaks), cpu * 1000 / max(1, done - first[1])

    def drain_noop(self, workers: int, total: int) -> float:
        """This service's worker on `total` no-op jobs of NOOP_QUEUE (queued by floor_enqueue): jobs/s."""
        target = min(total, self.drain_cap)
        procs = [
            subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=ROOT,
                # The worker takes only its send and control queues (QUEUES is checked against them).
                env={**self.env, "QUEUES": NOOP_QUEUE, "SEND_QUEUE": NOOP_QUEUE},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        queue = Queue(NOOP_QUEUE, connection=self.redis)
        before = queue.count
        first = None
        while True:
            done = before - queue.count
            now = time.perf_counter()
            if first is None and done > 0:
                first = (now, done)
            if done >= target:
                break
            dead = [proc.returncode for proc in procs if proc.poll() is not None]
            if dead:
                raise SystemExit(f"a worker on the no-op queue exited with status {dead[0]}; run it alone to see why")
            time.sleep(0.05)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        queue.empty()
        return (done - first[1]) / (now - first[0])

    def drain_tail(self, tag: str, size: int) -> tuple[float, float, float, float]:
        """The last tenth of a campaign. Sends a campaign to the tag, marks all but its last tenth sent in
        one UPDATE (leaving behind the index entries a campaign's progress leaves) and drops the window's
        jobs, then one worker refills the window and drains the rest. Returns (messages/s, seconds from the
        last message sent to the campaign being `sent`, and the send's answer and first-window seconds)."""
        campaign_id, answered, in_redis = self.send(tag)
        tail = min(size // 10, self.drain_cap)
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(
                "UPDATE outbound_messages SET status = 'sent', rendered_content = 'x', updated_at = now() "
                "WHERE campaign_id = %s AND id <= (SELECT max(id) FROM outbound_messages WHERE campaign_id = %s) - %s",
                (campaign_id, campaign_id, tail),
            )
        # The window's jobs now name sent messages: drop them, and let a worker refill the window from the rest.
        Queue(QUEUE, connection=self.redis).empty()
        Queue(CONTROL_QUEUE, connection=self.redis).enqueue("app.messaging.jobs.refill_window", campaign_id)
        finished = {}

        def wait_for_sent() -> None:
            start = time.perf_counter()
            with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
                query = "SELECT status FROM campaigns WHERE id = %s"
                while conn.execute(query, (campaign_id,)).fetchone()[0] != "sent":
                    time.sleep(0.01)
            finished["after"] = time.perf_counter() - start

        rate, _, _ = self.drain(campaign_id, 1, tail, then=wait_for_sent)
        return rate, finished["after"], answered, in_redis

    # -- floors ----------------------------------------------------------------------------------
    def floor_insert(self, tag: str) -> float:
        """The send's INSERT ... SELECT alone, into an empty copy of the table: the best of three, as sends."""
        times = []
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            for _ in range(3):
                conn.execute("CREATE TABLE bench_floor (LIKE outbound_messages INCLUDING ALL)")
                start = time.perf_counter()
                conn.execute(
                    "INSERT INTO bench_floor (campaign_id, customer_id, status, retry_count, created_at, updated_at) "
                    "SELECT 1, id, 'pending', 0, now(), now() FROM customers WHERE location = %s",
                    (tag,),
                )
                times.append(time.perf_counter() - start)
                conn.execute("DROP TABLE bench_floor")
        return min(times)

    def floor_enqueue(self, size: int) -> float:
        queue = Queue(NOOP_QUEUE, connection=self.redis)
        start = time.perf_counter()
        for offset in range(0, size, 1000):
            batch = [noop_job() for _ in range(min(1000, size - offset))]
            with self.redis.pipeline() as pipe:
                queue.enqueue_many(batch, pipeline=pipe)
                pipe.execute()
        elapsed = time.perf_counter() - start
        return elapsed

    def floor_drain(self, worker_class: str, count: int) -> float:
        """RQ's own worker on `count` no-op jobs (already queued by floor_enqueue, or queued here)."""
        queue = Queue(NOOP_QUEUE, connection=self.redis)
        if queue.count < count:
            self.floor_enqueue(count - queue.count)
        cmd = [
            sys.executable,
            "-m",
            "rq.cli",
            "worker",
            "--burst",
            "--url",
            REDIS_URL,
            "-w",
            worker_class,
            "--max-jobs",
            str(count),
            "--logging_level",
            "WARNING",
            NOOP_QUEUE,
        ]
        before = queue.count
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = None
        while proc.poll() is None:
            done = before - queue.count
            now = time.perf_counter()
            if first is None and done > 0:
                first = (now, done)
            time.sleep(0.05)
        done, now = before - queue.count, time.perf_counter()
        queue.empty()
        return (done - first[1]) / (now - first[0])

    # -- one size ----------------------------------------------------------------------------------
    def run_size(self, size: int) -> dict:
        tag = f"bench-{size}"
        log(f"{size}: import")
        imported = self.import_customers(size, tag)
        log(f"{size}: send (drain with 1 worker)")
        campaign_id, answer, in_redis = self.send(tag)
        floor_insert = self.floor_insert(tag)
        floor_enqueue = self.floor_enqueue(min(size, self.window))
        drain1, worker_mb, cpu_ms = self.drain(campaign_id, 1, size)
        log(f"{size}: send (drain with 2 workers)")
        campaign_id, answer2, in_redis2 = self.send(tag)
        drain2, worker_mb2, _ = self.drain(campaign_id, 2, size)
        log(f"{size}: send (drain the last tenth with 1 worker)")
        drain_tail, tail_to_sent, answer3, in_redis3 = self.drain_tail(tag, size)
        log(f"{size}: RQ no-op floors")
        noop_simple = self.floor_drain("rq.worker.SimpleWorker", min(size, self.drain_cap))
        noop_fork = self.floor_drain("rq.worker.Worker", min(size, self.drain_cap) // 10)
        self.floor_enqueue(min(size, self.drain_cap))
        noop_ours = self.drain_noop(1, min(size, self.drain_cap))
        self.web_peak.sample()
        return {
            "size": size,
            "import_s": imported,
            "send_answer_s": min(answer, answer2, answer3),  # the best of three sends
            "window_in_redis_s": min(in_redis, in_redis2, in_redis3),
            "floor_insert_s": floor_insert,
            "floor_enqueue_s": floor_enqueue,
            "drain_1_worker": drain1,
            "cpu_ms_per_message": cpu_ms,
            "drain_2_workers": drain2,
            "drain_tail": drain_tail,
            "tail_to_sent_s": tail_to_sent,
            "noop_ours": noop_ours,
            "noop_simpleworker": noop_simple,
            "noop_forking_worker": noop_fork,
            "web_peak_mb": self.web_peak.mb,
            "worker_peak_mb": max(worker_mb, worker_mb2),
        }


def table(results: list[dict]) -> str:
    rows = [
        ("import customers (s)", "import_s", None, None),
        ("`/send` answer (s)", "send_answer_s", "PG INSERT ... SELECT alone (s)", lambda r: r["floor_insert_s"]),
        (
            "first window in Redis (s)",
            "window_in_redis_s",
            "PG insert + RQ enqueue_many of a window (s)",
            lambda r: r["floor_insert_s"] + r["floor_enqueue_s"],
        ),
        (
            "drain, 1 worker (msg/s)",
            "drain_1_worker",
            "RQ SimpleWorker, no-op (jobs/s)",
            lambda r: r["noop_simpleworker"],
        ),
        (
            "drain, 2 workers (msg/s)",
            "drain_2_workers",
            "2 x RQ SimpleWorker, no-op",
            lambda r: 2 * r["noop_simpleworker"],
        ),
        (
            "drain, last tenth of the campaign, 1 worker (msg/s)",
            "drain_tail",
            "RQ SimpleWorker, no-op (jobs/s)",
            lambda r: r["noop_simpleworker"],
        ),
        ("last message sent to campaign `sent` (s)", "tail_to_sent_s", None, None),
        ("worker CPU per message, 1 worker (ms)", "cpu_ms_per_message", None, None),
        ("RQ forking Worker, no-op (jobs/s)", "noop_forking_worker", None, None),
        ("this service's worker, no-op (jobs/s)", "noop_ours", None, None),
        ("web peak RSS (MB)", "web_peak_mb", None, None),
        ("worker peak RSS (MB)", "worker_peak_mb", None, None),
    ]
    header = (
        "| measure | "
        + " | ".join(f"{r['size']:,}" for r in results)
        + " | floor | "
        + " | ".join(f"{r['size']:,} floor" for r in results)
        + " | ratio |"
    )
    lines = [header, "|" + " --- |" * (3 + 2 * len(results))]
    for label, key, floor_label, floor in rows:
        values = " | ".join(f"{r[key]:,.2f}" for r in results)
        if floor:
            floors = " | ".join(f"{floor(r):,.2f}" for r in results)
            ratio = " / ".join(f"{r[key] / floor(r):.2f}x" for r in results)
            lines.append(f"| {label} | {values} | {floor_label} | {floors} | {ratio} |")
        else:
            lines.append(f"| {label} | {values} | | {' | '.join('' for _ in results)} | |")
    if len(results) == 2:
        small, big = results
        growth = " ".join(
            f"{name} {big[key] / small[key]:.1f}x;"
            for name, key in [
                ("import", "import_s"),
                ("send answer", "send_answer_s"),
                ("first window in Redis", "window_in_redis_s"),
            ]
        )
        lines.append("")
        lines.append(f"{big['size'] // small['size']}x the recipients costs: {growth}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="End-to-end benchmark; prints a Markdown table.")
    parser.add_argument("--sizes", default="10000,100000", help="recipient counts, comma-separated")
    parser.add_argument("--drain-cap", type=int, default=10000, help="most messages drained per measurement")
    args = parser.parse_args()
    bench = Bench(args.drain_cap)
    bench.reset()
    bench.start_web()
    try:
        results = [bench.run_size(int(s)) for s in args.sizes.split(",")]
    finally:
        bench.stop()
    print(table(results))


if __name__ == "__main__":
    main()
