"""The web process under load and beside stalled clients, for choosing gunicorn's worker class and threads.

    python bench/web.py                          # sync (the old Procfile) and gthread with 2, 4, 8, 16 threads
    python bench/web.py --threads 8 --seconds 10

For each variant it starts the Procfile's web command (2 worker processes, `WEB_CONCURRENCY`) and measures:
- throughput and latency of `GET /campaigns` (a page of 20 and its count: two queries) from 8 concurrent
  clients with keep-alive connections;
- how many clients stalled mid-headers it takes before `GET /health` waits more than 5 s: 2, 4, 8, ... are
  opened, and /health is asked 4 times at each step.

Settings: BENCH_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/campaigns_bench; dropped and
recreated) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/12).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DATABASE_URL, REDIS_URL, ROOT, Bench, free_port, log  # noqa: E402

CLIENTS = 8
STALL_STEPS = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def procfile_web() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return command.strip()
    raise RuntimeError("no web process in the Procfile")


class Web:
    """The Procfile's web command with extra settings: `threads` threads per process, `"sync"` for gunicorn's
    sync worker, None for the Procfile's defaults. `public_base_url` sets PUBLIC_BASE_URL to its own URL.
    `app` serves another WSGI app than the service's under the same command (it must answer `/health`)."""

    def __init__(self, env: dict, threads: int | str | None, public_base_url: bool = False, app: str = "wsgi:app"):
        self.port = free_port()
        if threads == "sync":  # gunicorn turns a sync worker with threads into a threaded one: --threads 1
            variant = {"GUNICORN_CMD_ARGS": "--worker-class sync --threads 1"}
        else:
            variant = {"WEB_THREADS": str(threads)} if threads else {}
        if public_base_url:
            variant["PUBLIC_BASE_URL"] = self.base_url
        environment = {
            **env,
            **variant,
            "PORT": str(self.port),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_web().replace('wsgi:app', app, 1)}"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(300):
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("web process did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """Resident memory of the web process and its workers, in MB."""
        master = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [master, *master.children(recursive=True)]) / 2**20

    def get(self, path: str, timeout: float = 30, conn: http.client.HTTPConnection | None = None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        start = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": "Bearer bench-key"})
        response = conn.getresponse()
        response.read()
        if own:
            conn.close()
        return response.status, time.perf_counter() - start

    def post(self, path: str, body: dict, expect: int = 200, timeout: float = 120) -> tuple[dict, float]:
        """POST `body` as JSON with the bench's key: (the answer, seconds it took); an answer other than
        `expect` ends the benchmark."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        start = time.perf_counter()
        conn.request(
            "POST",
            path,
            body=json.dumps(body),
            headers={"Authorization": "Bearer bench-key", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        payload = json.loads(response.read())
        elapsed = time.perf_counter() - start
        conn.close()
        if response.status != expect:
            raise RuntimeError(f"{path}: {response.status} {payload}")
        return payload, elapsed

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait()


def throughput(web: Web, seconds: float) -> tuple[float, float, float]:
    """(requests/s, median ms, 99th percentile ms) of GET /campaigns from CLIENTS keep-alive clients."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
        mine = []
        while time.monotonic() < stop:
            status, elapsed = web.get("/campaigns?page_size=20", conn=conn)
            assert status == 200, status
            mine.append(elapsed)
        conn.close()
        latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies.sort()
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


def stalls_to_block(web: Web) -> tuple[int | None, float]:
    """The fewest clients stalled mid-headers with which /health took over 5 s (None: never, up to the
    last step), and the slowest /health seen below that."""
    stalled: list[socket.socket] = []
    slowest = 0.0
    try:
        for count in STALL_STEPS:
            while len(stalled) < count:
                client = socket.create_connection(("127.0.0.1", web.port))
                client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                stalled.append(client)
            time.sleep(0.5)
            for _ in range(4):
                try:
                    _, seconds = web.get("/health", timeout=6)
                except OSError:
                    return count, slowest
                if seconds > 5:
                    return count, slowest
                slowest = max(slowest, seconds)
        return None, slowest
    finally:
        for client in stalled:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Web process variants; prints a Markdown table.")
    parser.add_argument("--threads", default="sync,2,4,8,16", help="variants: sync, or gthread thread counts")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of load per variant")
    args = parser.parse_args()
    bench = Bench(drain_cap=0)
    bench.reset()
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:  # a page of campaigns to list
        conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "SELECT 'bench ' || n, 'sms', 'draft', 'Hi {first_name}', now(), now() FROM generate_series(1, 100) n"
        )
    env = {**bench.env, "API_RATE_LIMIT": "1000000 per minute", "WEB_CLIENT_TIMEOUT": "30"}
    rows = []
    for variant in args.threads.split(","):
        threads = "sync" if variant == "sync" else int(variant)
        log(f"web: {variant}")
        web = Web(env, threads)
        try:
            web.get("/campaigns?page_size=20")
            rate, median, p99 = throughput(web, args.seconds)
            memory = web.rss_mb()
            blocked_at, slowest = stalls_to_block(web)
        finally:
            web.stop()
        rows.append((variant, rate, median, p99, memory, blocked_at, slowest))
    print(f"Database {DATABASE_URL}, Redis {REDIS_URL}; 2 worker processes, {CLIENTS} clients.\n")
    print(
        "| worker | requests/s | median ms | p99 ms | RSS, all processes (MB) "
        "| stalled clients that block /health (> 5 s) | slowest /health before (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant, rate, median, p99, memory, blocked_at, slowest in rows:
        name = "sync" if variant == "sync" else f"gthread, {variant} threads"
        blocked = f">{STALL_STEPS[-1]}" if blocked_at is None else str(blocked_at)
        print(f"| {name} | {rate:.0f} | {median:.1f} | {p99:.1f} | {memory:.0f} | {blocked} | {slowest:.2f} |")


if __name__ == "__main__":
    main()
