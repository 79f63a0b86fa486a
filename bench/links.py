"""Short links: the redirect under load while a campaign sends, and shortening's cost in the send job.

    python bench/links.py                                  # 100k codes, 3 x 10 s per server; 3 x 2 drains of 10k
    python bench/links.py --seconds 5 --rounds 2 --send-messages 5000

1. The redirect. 100,000 messages of a campaign carry a link (inserted directly, `links` set; their codes
   are `app.links.codes.codec(app).encode(message_id, 0)` under the deployment's secret key, the one kept in
   the database). The Procfile's web command serves the service (`bench/web.py`'s `Web`: its gunicorn
   settings, `WEB_CONCURRENCY` processes of `WEB_THREADS` threads), and the same command serves a bare Flask
   app (`bare` below) answering a fixed 302 to a fixed URL. Meanwhile one `python worker.py` drains another
   campaign of 100,000 messages through the mock sender (`MOCK_SENDER_LATENCY`, 0.05 s). Clients (`--clients`
   keep-alive connections, in `CLIENT_PROCESSES` processes of their own) follow random codes among the 100k,
   for `--seconds` per run, the two servers taking turns `--rounds` times. For each: requests/s, p50/p99
   latency, the web processes' CPU (the gunicorn master and its workers) per request, the campaign's sends
   meanwhile; then the ratio of the rates, and the clicks recorded beside the 302s answered.
2. Shortening's cost. A campaign of `--send-messages` recipients whose template carries two URLs, sent
   through the API and drained by one worker (mock sender, no latency), with `track_links` false and true in
   turn, `--rounds` times each: the worker's CPU per message (from its first send, as `bench/run.py`
   measures a drain). Then the pure functions, in process: a code's encode and decode, and shortening a
   typical body, in µs per call.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import timeit
from pathlib import Path

import psycopg
from flask import Flask, Response

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import DATABASE_URL, REDIS_URL, ROOT, Bench, Peak, log  # noqa: E402
from web import Web  # noqa: E402

CODES = 100_000
CLIENT_PROCESSES = 2
LINK_BASE_URL = "https://go.example.com/l"
TARGET = "https://shop.example.com/offers/spring-sale?utm_source=sms&utm_campaign=spring"
TEMPLATE = (
    "Hi {first_name}, your {preferred_product} is 20% off until Sunday: "
    "https://shop.example.com/offers/spring-sale?utm_source=sms. Terms: https://shop.example.com/terms"
)

# The bare app: a fixed 302, served by the same gunicorn command as the service (`bench.links:bare`).
bare = Flask("bare")


@bare.get("/health")
def _health() -> str:
    return "ok"


@bare.get("/l/<code>")
def _redirect(code: str) -> Response:
    return Response(status=302, headers={"Location": TARGET, "Cache-Control": "no-store"})


# -- the clients ---------------------------------------------------------------------------------------
def _client_process(port: int, paths: list[str], seconds: float, threads: int, results) -> None:
    """`threads` keep-alive clients in this process, each asking random `paths` for `seconds`: puts
    (requests answered by status, latencies in seconds, seconds elapsed)."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        pick = random.Random().choice
        mine, counted = [], {}
        while time.monotonic() < stop:
            start = time.perf_counter()
            conn.request("GET", pick(paths))
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            counted[response.status] = counted.get(response.status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for status, count in counted.items():
                statuses[status] = statuses.get(status, 0) + count

    started = time.monotonic()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    results.put((statuses, latencies, time.monotonic() - started))


def load(web: Web, paths: list[str], seconds: float, clients: int) -> dict:
    """`clients` keep-alive clients following random `paths` on `web` for `seconds`: requests/s, p50 and
    p99 ms, the web processes' CPU ms per request, and the answers by status."""
    tree = Peak(web.proc.pid)
    cpu_before = tree.cpu()
    results = multiprocessing.Queue()
    per_process = [clients // CLIENT_PROCESSES + (n < clients % CLIENT_PROCESSES) for n in range(CLIENT_PROCESSES)]
    procs = [
        multiprocessing.Process(target=_client_process, args=(web.port, paths, seconds, threads, results))
        for threads in per_process
    ]
    for proc in procs:
        proc.start()
    answers = [results.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    cpu = tree.cpu() - cpu_before
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    for counted, mine, _ in answers:
        latencies.extend(mine)
        for status, count in counted.items():
            statuses[status] = statuses.get(status, 0) + count
    latencies.sort()
    requests = len(latencies)
    return {
        "rate": sum(len(mine) / elapsed for _, mine, elapsed in answers),
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(requests * 0.99)] * 1000,
        "cpu_ms": cpu * 1000 / requests,
        "statuses": statuses,
        "requests": requests,
    }


# -- 1. the redirect -------------------------------------------------------------------------------------
class Links(Bench):
    def __init__(self) -> None:
        super().__init__(drain_cap=0)
        self.env["LINK_BASE_URL"] = LINK_BASE_URL

    def create_campaign(self, name: str, track_links: bool, template: str = TEMPLATE) -> int:
        body = {"name": name, "channel": "sms", "base_template": template, "track_links": track_links}
        return self.request("POST", "/campaigns", body)["id"]

    def send_to(self, campaign_id: int, tag: str) -> int:
        """Send the campaign to the tag's customers; wait for its first window in Redis; messages queued."""
        answer = self.request("POST", f"/campaigns/{campaign_id}/send", {"audience": {"location": tag}})
        self.wait_for_jobs(min(answer["messages_queued"], self.window))
        return answer["messages_queued"]

    def start_workers(self, count: int, env: dict) -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=ROOT,
                env={**self.env, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(count)
        ]

    def issue_links(self, tag: str) -> tuple[int, list[str]]:
        """A campaign whose CODES messages (to the tag's customers, marked sent) each carry one link; returns
        its id and the codes, encoded as the service encodes them."""
        campaign_id = self.create_campaign("bench links clicked", True)
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute("UPDATE campaigns SET status = 'sent' WHERE id = %s", (campaign_id,))
            ids = conn.execute(
                "INSERT INTO outbound_messages (campaign_id, customer_id, status, rendered_content, segments, "
                "retry_count, links, clicks, sent_at, created_at, updated_at) "
                "SELECT %s, id, 'sent', 'x', 1, 0, jsonb_build_array(%s::text), 0, now(), now(), now() "
                "FROM customers WHERE location = %s ORDER BY id LIMIT %s RETURNING id",
                (campaign_id, TARGET, tag, CODES),
            ).fetchall()
        os.environ.update(self.env)  # the app's config is read from the environment when first imported
        from app import create_app
        from app.links.codes import codec

        app = create_app(overrides={"WORKER_PROCESS": True})
        with app.app_context():
            encode = codec(app).encode  # the deployment's key: the one the database keeps
        return campaign_id, [encode(message_id, 0) for (message_id,) in ids]

    def clicks(self, campaign_id: int) -> int:
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            return conn.execute(
                "SELECT coalesce(sum(clicks), 0)::bigint FROM outbound_messages WHERE campaign_id = %s", (campaign_id,)
            ).fetchone()[0]


def redirects(bench: Links, args) -> tuple[list[dict], dict]:
    bench.reset()
    servers: dict[str, Web] = {}
    workers: list[subprocess.Popen] = []
    answered = 0  # the 302s of the redirect, warm-ups included
    runs: list[dict] = []
    try:
        bench.start_web()  # the API the benchmark drives
        log(f"import {CODES:,} customers")
        bench.import_customers(CODES, "links")
        log("issue the codes")
        clicked_id, codes = bench.issue_links("links")
        paths = [f"/l/{code}" for code in codes]
        log("send a campaign of as many messages, drained by one worker meanwhile")
        sending_id = bench.create_campaign("bench links sending", True)
        bench.send_to(sending_id, "links")
        env = {**bench.env, "WEB_CLIENT_TIMEOUT": "30"}
        servers["redirect"] = Web(env, None)
        servers["bare"] = Web(env, None, app="bench.links:bare")
        workers = bench.start_workers(1, {"MOCK_SENDER_LATENCY": str(args.latency)})
        while bench.sent(sending_id) == 0:
            time.sleep(0.1)
        for name, web in servers.items():  # warm up: connections, pools, the key
            result = load(web, paths, 2, args.clients)
            answered += result["statuses"].get(302, 0) if name == "redirect" else 0
        for round_ in range(args.rounds):
            for name, web in servers.items():
                sent_before, started = bench.sent(sending_id), time.monotonic()
                result = load(web, paths, args.seconds, args.clients)
                result["sends"] = (bench.sent(sending_id) - sent_before) / (time.monotonic() - started)
                result.update(server=name, round=round_ + 1, load=os.getloadavg()[0])
                if name == "redirect":
                    answered += result["statuses"].get(302, 0)
                log(
                    f"{name}: {result['rate']:.0f}/s p50 {result['p50']:.1f} ms p99 {result['p99']:.1f} ms "
                    f"{result['cpu_ms']:.2f} CPU ms; sends {result['sends']:.0f}/s; {result['statuses']}"
                )
                runs.append(result)
        sent = bench.sent(sending_id)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait()
        for web in servers.values():
            web.stop()
        bench.stop()
    checks = {"answered": answered, "clicks": bench.clicks(clicked_id), "sent": sent}
    return runs, checks


# -- 2. shortening's cost ----------------------------------------------------------------------------------
def shortening(bench: Links, args) -> list[dict]:
    bench.reset()
    bench.env.update({"MOCK_SENDER_LATENCY": "0"})
    runs = []
    try:
        bench.start_web()
        bench.import_customers(args.send_messages, "shorten")
        for round_ in range(args.rounds):
            for track in (False, True):
                log(f"send {args.send_messages:,} messages, track_links {track}")
                campaign_id = bench.create_campaign(f"bench shorten {round_} {track}", track)
                queued = bench.send_to(campaign_id, "shorten")
                bench.drain_cap = queued
                rate, _, cpu_ms = bench.drain(campaign_id, 1, queued)
                log(f"track_links {track}: {rate:.0f} msg/s, {cpu_ms:.3f} CPU ms per message")
                runs.append({"track": track, "rate": rate, "cpu_ms": cpu_ms, "load": os.getloadavg()[0]})
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:  # the last campaign's bodies were shortened
            body, links = conn.execute(
                "SELECT rendered_content, links FROM outbound_messages WHERE campaign_id = %s AND links IS NOT NULL "
                "LIMIT 1",
                (campaign_id,),
            ).fetchone()
            log(f"a shortened body: {body!r}; its links {links}")
    finally:
        bench.stop()
    return runs


def micro() -> list[tuple[str, float]]:
    """µs per call of the pure functions, the best of 5 repeats."""
    from app.links.codes import Codec
    from app.links.shorten import Shortener
    from app.messaging.templates import render

    codec = Codec(os.urandom(32))
    code = codec.encode(123_456_789, 1)
    row = {"first_name": "Amina", "preferred_product": "maize flour"}
    body = render(TEMPLATE, row)
    one = body.split(" Terms:")[0]

    def shortened(text: str) -> str:
        shortener = Shortener(LINK_BASE_URL, lambda position: codec.encode(123_456_789, position))
        return shortener.shorten(text)

    cases = [
        ("Codec.encode", lambda: codec.encode(123_456_789, 1)),
        ("Codec.decode", lambda: codec.decode(code)),
        ("render the body (no shortening: the baseline)", lambda: render(TEMPLATE, row)),
        ("Shortener.shorten, a body with 1 URL (its codes included)", lambda: shortened(one)),
        ("Shortener.shorten, a body with 2 URLs (its codes included)", lambda: shortened(body)),
        ("Shortener.shorten, a body without a URL", lambda: shortened("Hi Amina, your order is on its way.")),
    ]
    results = []
    for name, call in cases:
        number = 20_000
        best = min(timeit.repeat(call, number=number, repeat=5)) / number
        results.append((name, best * 1e6))
    return results


# -- tables ----------------------------------------------------------------------------------------------
def spread(values: list[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    if round(low, digits) == round(high, digits):
        return f"{low:,.{digits}f}"
    return f"{low:,.{digits}f}-{high:,.{digits}f}"


def print_redirects(runs: list[dict], checks: dict, args) -> None:
    print(
        f"\nRedirect: {CODES:,} codes, {args.clients} keep-alive clients on random codes, {args.rounds} x "
        f"{args.seconds:.0f} s per server, taking turns; one worker sending another campaign meanwhile "
        f"(mock sender, {args.latency * 1000:.0f} ms). Ranges over the runs.\n"
    )
    print(
        "| server | requests/s | p50 ms | p99 ms | web CPU ms per request | campaign sends/s meanwhile | load (1 min) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in (("redirect", "`GET /l/{code}` (the service)"), ("bare", "bare Flask, fixed 302")):
        mine = [r for r in runs if r["server"] == name]
        print(
            f"| {label} | {spread([r['rate'] for r in mine], 0)} | {spread([r['p50'] for r in mine])} "
            f"| {spread([r['p99'] for r in mine])} | {spread([r['cpu_ms'] for r in mine], 2)} "
            f"| {spread([r['sends'] for r in mine], 0)} | {spread([r['load'] for r in mine])} |"
        )
    ratios = [
        r["rate"] / b["rate"]
        for r, b in zip(
            [r for r in runs if r["server"] == "redirect"], [r for r in runs if r["server"] == "bare"], strict=True
        )
    ]
    others = sorted({s for r in runs for s in r["statuses"] if s != 302})
    print(
        f"\nRedirect / bare rate, per round: {', '.join(f'{x:.2f}x' for x in ratios)} (target >= 0.6x); "
        f"redirect p99 {spread([r['p99'] for r in runs if r['server'] == 'redirect'])} ms (target < 50 ms)."
    )
    print(
        f"Clicks recorded: {checks['clicks']:,}; 302s answered by the redirect: {checks['answered']:,} "
        f"({'equal' if checks['clicks'] == checks['answered'] else 'DIFFERENT'}); other answers: {others or 'none'}; "
        f"the sending campaign's messages sent by the end: {checks['sent']:,}."
    )


def print_shortening(runs: list[dict], micro_results: list[tuple[str, float]], args) -> None:
    print(
        f"\nShortening in the send job: {args.send_messages:,} messages a campaign, two URLs in the template, one "
        f"worker, mock sender without latency; {args.rounds} campaigns each way, in turns.\n"
    )
    print("| track_links | msg/s | worker CPU ms per message | load (1 min) |")
    print("| --- | --- | --- | --- |")
    for track in (False, True):
        mine = [r for r in runs if r["track"] is track]
        print(
            f"| {str(track).lower()} | {spread([r['rate'] for r in mine], 0)} "
            f"| {spread([r['cpu_ms'] for r in mine], 3)} | {spread([r['load'] for r in mine])} |"
        )
    off = [r["cpu_ms"] for r in runs if not r["track"]]
    on = [r["cpu_ms"] for r in runs if r["track"]]
    change = statistics.median(on) / statistics.median(off) - 1
    print(
        f"\nCPU per message with shortening, median over median: {change:+.1%} (target <= +10%); "
        f"the runs without it spread over {(max(off) - min(off)) / statistics.median(off):.1%} of their median."
    )
    print("\n| pure function | µs per call |")
    print("| --- | --- |")
    for name, us in micro_results:
        print(f"| {name} | {us:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description="Short links' redirect and shortening; prints Markdown tables.")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of load per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server, and campaigns each way")
    parser.add_argument("--clients", type=int, default=12, help="concurrent keep-alive clients")
    parser.add_argument("--latency", type=float, default=0.05, help="MOCK_SENDER_LATENCY of the sending worker")
    parser.add_argument("--send-messages", type=int, default=10_000, help="messages of each shortening campaign")
    parser.add_argument("--skip", choices=["redirect", "shortening"], help="leave one part out")
    args = parser.parse_args()
    bench = Links()
    log(f"database {DATABASE_URL}, Redis {REDIS_URL}")
    redirect_runs = checks = shorten_runs = None
    if args.skip != "redirect":
        redirect_runs, checks = redirects(bench, args)
    if args.skip != "shortening":
        shorten_runs = shortening(bench, args)
    micro_results = micro()
    print(f"\n{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}.")
    if redirect_runs:
        print_redirects(redirect_runs, checks, args)
    if shorten_runs:
        print_shortening(shorten_runs, micro_results, args)


if __name__ == "__main__":
    main()
