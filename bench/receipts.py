"""Delivery receipts absorbed by the Procfile's web process: a burst of signed receipts, as fast as a
provider would post them.

    python bench/receipts.py                    # 5,000 Twilio status callbacks, then WhatsApp posts of 50 statuses
    python bench/receipts.py --receipts 20000 --clients 64

It stores as many messages as receipts (sent by Twilio or WhatsApp, with their provider ids), starts the
Procfile's web command (its defaults: `WEB_CONCURRENCY` processes of `WEB_THREADS` threads), signs every
receipt before the clock starts (Twilio's with Twilio's own `RequestValidator`, Meta's with HMAC-SHA256),
then posts them from `--clients` keep-alive connections and measures: receipts applied per second, each
answer's latency, and the answers that were not 200. It then checks in the database that every message
took its receipt. Prints a Markdown table.

Settings: BENCH_DATABASE_URL and BENCH_REDIS_URL (see bench/run.py; the database is dropped and recreated).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import psycopg
from twilio.request_validator import RequestValidator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import DATABASE_URL, Bench, log  # noqa: E402
from web import Web  # noqa: E402

TWILIO_TOKEN = "bench-twilio-token"
TWILIO_SID = "AC" + "0" * 32
APP_SECRET = "bench-app-secret"


def store_messages(count: int, provider: str, campaign_name: str) -> list[str]:
    """`count` customers, a campaign and one message each, taken by `provider`; returns their provider ids."""
    prefix = {"twilio": "SM", "whatsapp_cloud": "wamid.bench"}[provider]
    channel = "whatsapp" if provider == "whatsapp_cloud" else "sms"
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        start = conn.execute("SELECT coalesce(max(id), 0) FROM customers").fetchone()[0]
        conn.execute(
            "INSERT INTO customers (phone, created_at, updated_at) "
            "SELECT '+2547' || lpad((%s + n)::text, 8, '0'), now(), now() FROM generate_series(1, %s) n",
            (start, count),
        )
        campaign_id = conn.execute(
            "INSERT INTO campaigns (name, channel, status, base_template, created_at, updated_at) "
            "VALUES (%s, %s, 'sent', 'Hi', now(), now()) RETURNING id",
            (campaign_name, channel),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO outbound_messages (campaign_id, customer_id, status, rendered_content, retry_count, "
            "provider, provider_message_id, created_at, updated_at) "
            "SELECT %s, id, 'sent', 'Hi', 0, %s, %s || lpad(id::text, 32, '0'), now(), now() "
            "FROM customers WHERE id > %s",
            (campaign_id, provider, prefix, start),
        )
        conn.execute("VACUUM ANALYZE outbound_messages")
        return [f"{prefix}{customer:032d}" for customer in range(start + 1, start + count + 1)]


def twilio_requests(base_url: str, sids: list[str]) -> list[tuple[str, bytes, dict]]:
    url = f"{base_url}/webhooks/twilio/status"
    validator = RequestValidator(TWILIO_TOKEN)
    requests = []
    for sid in sids:
        params = {
            "AccountSid": TWILIO_SID,
            "ApiVersion": "2010-04-01",
            "From": "+15005550006",
            "MessageSid": sid,
            "MessageStatus": "delivered",
            "SmsSid": sid,
            "SmsStatus": "delivered",
            "To": "+254700000000",
            "RawDlrDoneDate": "2611271200",
        }
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": validator.compute_signature(url, params),
        }
        requests.append(("/webhooks/twilio/status", urlencode(params).encode(), headers))
    return requests


def whatsapp_requests(wamids: list[str], per_post: int) -> list[tuple[str, bytes, dict]]:
    requests = []
    for start in range(0, len(wamids), per_post):
        statuses = [
            {"id": wamid, "status": "delivered", "timestamp": str(int(time.time())), "recipient_id": "254700000000"}
            for wamid in wamids[start : start + per_post]
        ]
        value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1"}, "statuses": statuses}
        body = json.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
            }
        ).encode()
        signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature}
        requests.append(("/webhooks/whatsapp", body, headers))
    return requests


def post_all(port: int, requests: list[tuple[str, bytes, dict]], clients: int) -> tuple[float, list[float], list[int]]:
    """Post every request from `clients` keep-alive connections; (seconds, latencies, non-200 statuses)."""
    work: queue.Queue = queue.Queue()
    for request in requests:
        work.put(request)
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            try:
                path, body, headers = work.get_nowait()
            except queue.Empty:
                break
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    failures.append(response.status)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, failures


def delivered(campaign_name: str) -> int:
    with psycopg.connect(DATABASE_URL) as conn:
        return conn.execute(
            "SELECT count(*) FROM outbound_messages m JOIN campaigns c ON c.id = m.campaign_id "
            "WHERE c.name = %s AND m.status = 'delivered'",
            (campaign_name,),
        ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="Receipts absorbed by the web process; prints a Markdown table.")
    parser.add_argument("--receipts", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=32, help="concurrent connections posting receipts")
    parser.add_argument("--per-post", type=int, default=50, help="WhatsApp statuses in one post")
    args = parser.parse_args()
    bench = Bench(drain_cap=0)
    bench.reset()
    sids = store_messages(args.receipts, "twilio", "twilio receipts")
    wamids = store_messages(args.receipts, "whatsapp_cloud", "whatsapp receipts")
    env = {
        **bench.env,
        "SMS_PROVIDER": "twilio",
        "WHATSAPP_PROVIDER": "whatsapp_cloud",
        "TWILIO_ACCOUNT_SID": TWILIO_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_FROM": "+15005550006",
        "WHATSAPP_ACCESS_TOKEN": "bench",
        "WHATSAPP_PHONE_NUMBER_ID": "1",
        "WHATSAPP_APP_SECRET": APP_SECRET,
        "WHATSAPP_VERIFY_TOKEN": "bench",
    }
    web = Web(env, threads=None, public_base_url=True)
    rows = []
    try:
        for name, requests, campaign in (
            ("Twilio status callbacks, one receipt each", twilio_requests(web.base_url, sids), "twilio receipts"),
            (
                f"WhatsApp posts of {args.per_post} statuses",
                whatsapp_requests(wamids, args.per_post),
                "whatsapp receipts",
            ),
        ):
            log(f"posting {name}")
            seconds, latencies, failures = post_all(web.port, requests, args.clients)
            latencies.sort()
            rows.append(
                (
                    name,
                    args.receipts,
                    seconds,
                    args.receipts / seconds,
                    statistics.median(latencies) * 1000,
                    latencies[int(len(latencies) * 0.99)] * 1000,
                    latencies[-1] * 1000,
                    len(failures),
                    delivered(campaign),
                )
            )
    finally:
        web.stop()
    print(f"{args.clients} concurrent connections; the Procfile's web with its default processes and threads.\n")
    print("| receipts | count | seconds | applied/s | median ms | p99 ms | max ms | answers not 200 | delivered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, count, seconds, rate, median, p99, slowest, failures, done in rows:
        print(
            f"| {name} | {count} | {seconds:.2f} | {rate:.0f} | {median:.1f} | {p99:.1f} | {slowest:.0f} "
            f"| {failures} | {done} |"
        )


if __name__ == "__main__":
    main()
