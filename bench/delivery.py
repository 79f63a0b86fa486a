"""Delivery at provider speed: `worker` processes sending through a local fake provider that answers each
request after `--latency` seconds, under a shared `SMS_RATE_LIMIT`, and the same workers against RQ's own
floors with no latency and no limit.

    python bench/delivery.py                          # 200 ms latency, 100/second, 3,000 messages a run
    python bench/delivery.py --messages 6000 --latency 0.3 --limit 80/second

Each run sends one campaign (through the API: `POST /campaigns/{id}/send` to an audience) and drains it
with 1, then 2, `python worker.py` processes at their default settings (`WORKER_CONCURRENCY`), through
a Twilio stand-in (a small HTTP server in a process of its own, answering every request after the
latency; see `QuickTwilio`). It measures at the provider, from the time each request arrived: messages
per second over the run (from the first request to the last), the most requests in any 1-second window,
and the resident memory of each worker's whole process tree (the worker and any child it starts), the
peak of their sum. Then, with no latency and no limit (the mock provider), one worker's drain rate beside
RQ's own `SimpleWorker` on no-op jobs queued with the same options, and how long an audience send takes
until every job is in Redis beside PostgreSQL's `INSERT ... SELECT` plus RQ's `enqueue_many` of as many
jobs (see bench/run.py for those floors). Prints Markdown tables.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import QUEUE, Bench, free_port, log  # noqa: E402


class QuickTwilio:
    """A Twilio stand-in in a process of its own, on one asyncio thread: it stamps each request's arrival
    as its first bytes are read, then answers Twilio's `201 {"sid": ...}` after the latency. The tests'
    fake providers (threads, full checks) share this process's interpreter with the benchmark: on two
    loaded cores their own pauses would move the stamps by tens of milliseconds."""

    def __init__(self, latency: float):
        self.latency = latency
        self.port = free_port()
        self.control = multiprocessing.Queue()
        self.results = multiprocessing.Queue()
        arguments = (self.port, latency, self.control, self.results)
        self.process = multiprocessing.Process(target=_serve_twilio, args=arguments)
        self.process.start()
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the quick Twilio did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arrivals(self, clear: bool = False) -> list[float]:
        self.control.put("clear" if clear else "get")
        return self.results.get(timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


def _serve_twilio(port: int, latency: float, control, results) -> None:
    import asyncio
    import gc
    import itertools
    import threading

    arrivals: list[float] = []
    sids = itertools.count(1)
    gc.disable()  # a collection would pause the stamps

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            arrivals.append(time.time())
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            await asyncio.sleep(latency)
            body = b'{"sid": "SM%032d", "status": "queued"}' % next(sids)
            writer.write(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()

    async def guarded(reader, writer) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def answer_control() -> None:
        while True:
            what = control.get()
            results.put(list(arrivals))
            if what == "clear":
                arrivals.clear()

    threading.Thread(target=answer_control, daemon=True).start()

    async def main() -> None:
        server = await asyncio.start_server(guarded, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def most_in_any_window(times: list[float], window: float = 1.0) -> int:
    """The most of `times` (sorted) that fall in any half-open interval of `window` seconds."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


class TreeMemory:
    """Peak of the summed resident memory of some processes and all their children."""

    def __init__(self, pids: list[int]):
        self.roots = [psutil.Process(pid) for pid in pids]
        self.peak = 0

    def sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                for process in (root, *root.children(recursive=True)):
                    total += process.memory_info().rss
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


class Delivery(Bench):
    def __init__(self, provider: QuickTwilio, limit: str):
        super().__init__(drain_cap=10_000)
        self.provider = provider
        self.env.update(
            {
                "SMS_PROVIDER": "twilio",
                "TWILIO_BASE_URL": provider.base_url,
                "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
                "TWILIO_AUTH_TOKEN": "bench-token",
                "TWILIO_FROM": "+15005550006",
                "PUBLIC_BASE_URL": "http://127.0.0.1:1",  # receipts are not part of this benchmark
                "SMS_RATE_LIMIT": limit,
            }
        )

    def deliver(self, tag: str, workers: int, expected: int) -> dict:
        """Send the tag's campaign and drain it with `workers` worker processes, measured at the provider."""
        self.provider.arrivals(clear=True)
        self.send(tag)
        procs = [
            subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        memory = TreeMemory([p.pid for p in procs])
        deadline = time.monotonic() + expected / 5 + 60
        while len(self.provider.arrivals()) < expected and time.monotonic() < deadline:
            for _ in range(5):
                memory.sample()
                time.sleep(0.1)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        times = sorted(self.provider.arrivals())
        if os.environ.get("BENCH_ARRIVALS"):  # for a closer look: one arrival time a line
            Path(f"{os.environ['BENCH_ARRIVALS']}.{workers}").write_text("\n".join(map(repr, times)))
        seconds = times[-1] - times[0]
        steady = [at for at in times if at >= times[0] + 1.0]  # the workers' start-up is not delivery
        return {
            "workers": workers,
            "messages": len(times),
            "seconds": seconds,
            "rate": (len(times) - 1) / seconds if seconds else 0.0,
            "steady": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0,
            "most_in_1s": most_in_any_window(times),
            "mb": memory.mb,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="Delivery through a slow provider; prints Markdown tables.")
    parser.add_argument("--messages", type=int, default=3000, help="recipients of each run")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake provider takes to answer")
    parser.add_argument("--limit", default="100/second", help="SMS_RATE_LIMIT of the workers")
    parser.add_argument("--floors", type=int, default=5000, help="messages of the no-latency runs (0: skip them)")
    args = parser.parse_args()

    provider = QuickTwilio(args.latency)
    bench = Delivery(provider, args.limit)
    rows = []
    try:
        bench.reset()
        bench.start_web()
        if args.messages:
            bench.import_customers(args.messages, "delivery")
        for workers in (1, 2) if args.messages else ():
            log(f"{workers} worker(s), {args.latency * 1000:.0f} ms latency, {args.limit}")
            rows.append(bench.deliver("delivery", workers, args.messages))
        floors = None
        if args.floors:
            bench.env.update({"SMS_PROVIDER": "mock", "SMS_RATE_LIMIT": "", "MOCK_SENDER_LATENCY": "0"})
            bench.stop()
            bench.start_web()
            bench.import_customers(args.floors, "floors")
            log("no latency, no limit: 1 worker, and RQ's SimpleWorker on no-op jobs")
            _, _, in_redis = bench.send("floors")
            drain, _ = bench.drain(1, args.floors)
            insert = bench.floor_insert("floors")
            enqueue = bench.floor_enqueue(args.floors)
            noop = bench.floor_drain("rq.worker.SimpleWorker", args.floors)
            floors = {"drain": drain, "noop": noop, "in_redis": in_redis, "floor": insert + enqueue}
    finally:
        bench.stop()
        provider.stop()
        bench.redis.delete(f"rq:queue:{QUEUE}")

    print(
        f"\n{args.messages} messages a run; fake provider answering after {args.latency * 1000:.0f} ms; "
        f"SMS_RATE_LIMIT={args.limit}; default WORKER_CONCURRENCY.\n"
    )
    print(
        "| workers | messages | seconds | msg/s at the provider | msg/s after the first second | most in any 1 s "
        "| peak RSS of the workers (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['workers']} | {row['messages']} | {row['seconds']:.1f} | {row['rate']:.1f} | {row['steady']:.1f} "
            f"| {row['most_in_1s']} | {row['mb']:.0f} |"
        )
    if floors:
        print(f"\nNo latency, no limit, {args.floors} messages:\n")
        print("| measure | this service | floor | ratio |")
        print("| --- | --- | --- | --- |")
        print(
            f"| drain, 1 worker (msg/s) vs RQ SimpleWorker no-op (jobs/s) | {floors['drain']:.0f} "
            f"| {floors['noop']:.0f} | {floors['drain'] / floors['noop']:.2f}x |"
        )
        print(
            f"| audience send until every job is in Redis (s) vs INSERT ... SELECT + enqueue_many (s) "
            f"| {floors['in_redis']:.2f} | {floors['floor']:.2f} | {floors['in_redis'] / floors['floor']:.2f}x |"
        )


if __name__ == "__main__":
    main()
