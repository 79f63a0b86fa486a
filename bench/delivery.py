"""Delivery at provider speed, with receipts flowing back as a real provider posts them.

    python bench/delivery.py                          # 200 ms latency, 100/second, 3,000 messages a run
    python bench/delivery.py --messages 1500 --latency 0.2 --limit 100/second --workers 1 --no-receipts

Each run sends one campaign (through the API: `POST /campaigns/{id}/send` to an audience) and drains it
with `python worker.py` processes at their default settings (`WORKER_CONCURRENCY`), through a Twilio
stand-in (`QuickTwilio`, a small HTTP server in a process of its own) that answers every request after the
latency and, like Twilio, posts two signed status callbacks per message it took (`sent` at once,
`delivered` a second later) to the Procfile's web process. It measures:
- at the provider, from the time each request arrived: messages per second over the run, the most
  requests in any 1-second window;
- the CPU time the worker processes (their whole trees, from the first request at the provider: their
  start-up is left out) and the web process (its whole tree) spent over the run, per message sent and per
  receipt posted: a rate doubles or halves with the machine's load, CPU per unit of work does not;
- the peak resident memory of the workers' trees.
Then, with no latency, no limit and no receipts (the mock provider), one worker's drain rate and CPU per
message beside RQ's own `SimpleWorker` on no-op jobs. Prints Markdown tables.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from run import Bench, free_port, log  # noqa: E402
from web import Web  # noqa: E402

from app.messaging.providers.twilio import signature  # noqa: E402

AUTH_TOKEN = "bench-token"
# Seconds after the answer at which the stand-in posts each status callback of a message it took.
CALLBACKS = (("sent", 0.0), ("delivered", 1.0))


class QuickTwilio:
    """A Twilio stand-in in a process of its own, on one asyncio thread: it stamps each request's arrival
    as its first bytes are read, answers Twilio's `201 {"sid": ...}` after the latency, and (given a
    `callback_url`) posts each message's status callbacks there, signed as Twilio signs them, over a few
    keep-alive connections. The tests' fake providers (threads, full checks) share this process's
    interpreter with the benchmark: on two loaded cores their own pauses would move the stamps."""

    def __init__(self, latency: float, callback_url: str | None = None):
        self.latency = latency
        self.port = free_port()
        self.control = multiprocessing.Queue()
        self.results = multiprocessing.Queue()
        arguments = (self.port, latency, callback_url, self.control, self.results)
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

    def state(self, clear: bool = False) -> dict:
        """`arrivals` (the send requests' arrival times) and `callbacks` (the status of each callback's answer)."""
        self.control.put("clear" if clear else "get")
        return self.results.get(timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


def _serve_twilio(port: int, latency: float, callback_url: str | None, control, results) -> None:
    import asyncio
    import gc
    import itertools
    import threading
    from urllib.parse import urlencode, urlsplit

    arrivals: list[float] = []
    answered: list[int] = []
    sids = itertools.count(1)
    gc.disable()  # a collection would pause the stamps

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, callbacks) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            arrivals.append(time.time())
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            await asyncio.sleep(latency)
            sid = f"SM{next(sids):032d}"
            body = b'{"sid": "%s", "status": "queued"}' % sid.encode()
            writer.write(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
            if callbacks is not None:
                loop = asyncio.get_running_loop()
                for status, after in CALLBACKS:
                    loop.call_later(after, callbacks.put_nowait, (sid, status))

    async def post_callbacks(callbacks: asyncio.Queue) -> None:
        """One keep-alive connection to the web process, posting callbacks one after another."""
        url = urlsplit(callback_url)
        path = url.path
        reader = writer = None
        while True:
            sid, status = await callbacks.get()
            params = [("AccountSid", "AC" + "0" * 32), ("MessageSid", sid), ("MessageStatus", status)]
            form = urlencode(params).encode()
            signed = signature(callback_url, params, AUTH_TOKEN)
            request = (
                f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"X-Twilio-Signature: {signed}\r\nContent-Length: {len(form)}\r\n\r\n"
            ).encode() + form
            for _ in range(3):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(url.hostname, url.port)
                    writer.write(request)
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    keep = True
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                        if line.lower() == b"connection: close":
                            keep = False
                    await reader.readexactly(length)
                    answered.append(int(head.split(b" ", 2)[1]))
                    if not keep:
                        writer.close()
                        writer = None
                    break
                except (OSError, asyncio.IncompleteReadError):
                    writer = None

    def answer_control() -> None:
        while True:
            what = control.get()
            results.put({"arrivals": list(arrivals), "callbacks": list(answered)})
            if what == "clear":
                arrivals.clear()
                answered.clear()

    threading.Thread(target=answer_control, daemon=True).start()

    async def main() -> None:
        callbacks = asyncio.Queue() if callback_url else None
        if callbacks is not None:
            for _ in range(8):  # Twilio posts from several connections at once
                asyncio.create_task(post_callbacks(callbacks))

        async def guarded(reader, writer) -> None:
            try:
                await handle(reader, writer, callbacks)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

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


class Trees:
    """Some processes and all their children: the peak of their summed resident memory, and their CPU time."""

    def __init__(self, pids: list[int]):
        self.roots = [psutil.Process(pid) for pid in pids]
        self.peak = 0
        self.seen: dict[int, float] = {}  # CPU seconds of each process, as last read

    def sample(self) -> None:
        total = 0
        for root in self.roots:
            try:
                for process in (root, *root.children(recursive=True)):
                    with process.oneshot():
                        total += process.memory_info().rss
                        times = process.cpu_times()
                        self.seen[process.pid] = times.user + times.system
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)

    def cpu(self) -> float:
        """CPU seconds spent by the processes seen so far (as last sampled)."""
        return sum(self.seen.values())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


class Delivery(Bench):
    def __init__(self, provider: QuickTwilio, limit: str, web: Web | None):
        super().__init__(drain_cap=10_000)
        self.provider = provider
        self.web_process = web
        self.env.update(
            {
                "SMS_PROVIDER": "twilio",
                "TWILIO_BASE_URL": provider.base_url,
                "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_FROM": "+15005550006",
                "PUBLIC_BASE_URL": web.base_url if web else "http://127.0.0.1:1",
                "SMS_RATE_LIMIT": limit,
                "LOG_LEVEL": "INFO",  # as deployed: the logs' cost is part of a send's
            }
        )

    def deliver(self, tag: str, workers: int, expected: int) -> dict:
        """Send the tag's campaign and drain it with `workers` worker processes, measured at the provider;
        wait for the receipts of the last messages, then read the processes' CPU."""
        self.provider.state(clear=True)
        web = Trees([self.web_process.proc.pid]) if self.web_process else None
        if web:
            web.sample()
        web_before = web.cpu() if web else 0.0
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
        trees = Trees([p.pid for p in procs])
        deadline = time.monotonic() + expected / 5 + 60
        receipts_expected = expected * len(CALLBACKS) if web else 0
        started = None  # (CPU seconds of the workers, messages at the provider) when the first arrived
        while time.monotonic() < deadline:
            state = self.provider.state()
            if started is None and state["arrivals"]:
                trees.sample()  # the workers' start-up (imports, the app) is not a send's cost
                started = (trees.cpu(), len(state["arrivals"]))
            if len(state["arrivals"]) >= expected and len(state["callbacks"]) >= receipts_expected:
                break
            for _ in range(5):
                trees.sample()
                if web:
                    web.sample()
                time.sleep(0.1)
        trees.sample()
        if web:
            web.sample()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        state = self.provider.state()
        times = sorted(state["arrivals"])
        seconds = times[-1] - times[0]
        steady = [at for at in times if at >= times[0] + 1.0]  # the workers' start-up is not delivery
        return {
            "workers": workers,
            "messages": len(times),
            "seconds": seconds,
            "rate": (len(times) - 1) / seconds if seconds else 0.0,
            "steady": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0,
            "most_in_1s": most_in_any_window(times),
            "mb": trees.mb,
            "worker_cpu_ms": (trees.cpu() - started[0]) * 1000 / max(1, len(times) - started[1]),
            "receipts": len(state["callbacks"]),
            "refused": sum(1 for status in state["callbacks"] if status != 200),
            "web_cpu_ms": (web.cpu() - web_before) * 1000 / max(1, len(state["callbacks"])) if web else None,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description="Delivery through a slow provider; prints Markdown tables.")
    parser.add_argument("--messages", type=int, default=3000, help="recipients of each run")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake provider takes to answer")
    parser.add_argument("--limit", default="100/second", help="SMS_RATE_LIMIT of the workers")
    parser.add_argument("--workers", default="1,2", help="worker processes of each run, comma-separated")
    parser.add_argument("--no-receipts", action="store_true", help="the stand-in posts no status callbacks")
    parser.add_argument("--floors", type=int, default=5000, help="messages of the no-latency runs (0: skip them)")
    args = parser.parse_args()

    base = Bench(drain_cap=10_000)
    base.reset()
    web = provider = bench = None
    rows = []
    floors = None
    try:
        if not args.no_receipts:
            twilio = {
                "SMS_PROVIDER": "twilio",
                "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "TWILIO_FROM": "+15005550006",
                "LOG_LEVEL": "INFO",
            }
            web = Web({**base.env, **twilio}, None, public_base_url=True)  # the Procfile's web: the receipts' end
        provider = QuickTwilio(args.latency, f"{web.base_url}/webhooks/twilio/status" if web else None)
        bench = Delivery(provider, args.limit, web)
        bench.start_web()  # the API the benchmark drives (one gunicorn process)
        if args.messages:
            bench.import_customers(args.messages, "delivery")
        for workers in [int(w) for w in args.workers.split(",")] if args.messages else ():
            log(f"{workers} worker(s), {args.latency * 1000:.0f} ms latency, {args.limit}, receipts: {bool(web)}")
            rows.append(bench.deliver("delivery", workers, args.messages))
        if args.floors:
            bench.env.update(
                {"SMS_PROVIDER": "mock", "SMS_RATE_LIMIT": "", "MOCK_SENDER_LATENCY": "0", "LOG_LEVEL": "WARNING"}
            )
            bench.stop()
            bench.start_web()
            bench.import_customers(args.floors, "floors")
            log("no latency, no limit: 1 worker, and RQ's SimpleWorker on no-op jobs")
            campaign_id, _, _ = bench.send("floors")
            drain, _, cpu_ms = bench.drain(campaign_id, 1, args.floors)
            noop = bench.floor_drain("rq.worker.SimpleWorker", args.floors)
            floors = {"drain": drain, "noop": noop, "cpu_ms": cpu_ms}
    finally:
        if bench:
            bench.stop()
        if provider:
            provider.stop()
        if web:
            web.stop()

    receipts = (
        "posting `sent` and `delivered` callbacks to the Procfile's web" if not args.no_receipts else "no receipts"
    )
    print(
        f"\n{args.messages} messages a run; fake provider answering after {args.latency * 1000:.0f} ms, {receipts}; "
        f"SMS_RATE_LIMIT={args.limit}; default WORKER_CONCURRENCY; LOG_LEVEL=INFO.\n"
    )
    print(
        "| workers | messages | seconds | msg/s at the provider | msg/s after the first second | most in any 1 s "
        "| worker CPU per message (ms) | receipts (refused) | web CPU per receipt (ms) | peak RSS of the workers (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        web_cpu = f"{row['web_cpu_ms']:.2f}" if row["web_cpu_ms"] is not None else "-"
        print(
            f"| {row['workers']} | {row['messages']} | {row['seconds']:.1f} | {row['rate']:.1f} | {row['steady']:.1f} "
            f"| {row['most_in_1s']} | {row['worker_cpu_ms']:.2f} | {row['receipts']} ({row['refused']}) | {web_cpu} "
            f"| {row['mb']:.0f} |"
        )
    if floors:
        print(f"\nNo latency, no limit, no receipts, {args.floors} messages:\n")
        print("| measure | this service | floor | ratio |")
        print("| --- | --- | --- | --- |")
        print(
            f"| drain, 1 worker (msg/s) vs RQ SimpleWorker no-op (jobs/s) | {floors['drain']:.0f} "
            f"| {floors['noop']:.0f} | {floors['drain'] / floors['noop']:.2f}x |"
        )
        print(f"| worker CPU per message (ms) | {floors['cpu_ms']:.2f} | | |")


if __name__ == "__main__":
    main()
