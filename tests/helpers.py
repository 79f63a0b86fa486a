"""Helpers for tests: the Procfile, free ports, and raw HTTP requests to a served process."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterable
from pathlib import Path
from unittest.mock import ANY
from urllib.parse import urlsplit

from app.models import MessageStatus

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile_command(name: str) -> str:
    """The command of the Procfile's process `name` (`web`, `worker`, ...), as written there."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, sep, command = line.partition(":")
        if sep and process.strip() == name:
            return command.strip()
    raise AssertionError(f"the Procfile has no {name!r} process")


def _chunked(parts: Iterable[bytes]) -> Iterable[bytes]:
    for part in parts:
        if part:
            yield b"%x\r\n%s\r\n" % (len(part), part)
    yield b"0\r\n\r\n"


def raw_request(
    base_url: str,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    chunked: bool = False,
    chunk_size: int = 64 * 1024,
    timeout: float = 120,
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request over a plain socket, the body with `Content-Length` or, when
    `chunked`, with `Transfer-Encoding: chunked` in pieces of `chunk_size`; returns (status,
    headers, body). A server that answers before reading the whole body is still heard."""
    url = urlsplit(base_url)
    head = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        pieces = _chunked(body[i : i + chunk_size] for i in range(0, len(body), chunk_size))
    else:
        head.append(f"Content-Length: {len(body)}")
        pieces = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
    try:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            for piece in pieces:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (a 413) and stopped reading: its answer is still there to read
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        sock.close()


def job_ids_of(messages) -> list[str]:
    """The RQ job ids of these messages' current turns in their campaigns' windows."""
    from app.messaging.send.window import message_job_id

    return [message_job_id(m.id, m.job_seq) for m in messages]


def stats(**counts: int) -> dict[str, int]:
    """A campaign's `stats` as the API answers them: every status counted (0 unless given), `read`, `clicked`,
    `clicks` and `total`;
    `segments_sent` is compared only when given (the tests of segments give it); `waiting_quiet_hours`,
    `held_by_provider` and the SMS fallbacks' counts are 0 unless given."""
    fallbacks = ("total", *MessageStatus.ALL, "skipped_opted_out", "skipped_frequency_cap")
    return {
        **{f"fallback_{name}": 0 for name in fallbacks},
        "delivered_after_fallback": 0,
        "variants": {},
        "segments_sent": ANY,
        "total": 0,
        "pending": 0,
        "queued": 0,
        "sending": 0,
        "sent": 0,
        "delivered": 0,
        "undelivered": 0,
        "failed": 0,
        "canceled": 0,
        "read": 0,
        "clicked": 0,
        "clicks": 0,
        "waiting_quiet_hours": 0,
        "held_by_provider": 0,
        **counts,
    }


def claim(message, worker: str = "test:1", lease_seconds: float = 60):
    """Claim `message` (queued, with its current `job_seq`) as its send job would; returns the `Claim`, or
    None when the claim took nothing (the message was not queued, or its campaign was not sending)."""
    import random
    from datetime import timedelta

    from app import clock
    from app.messaging.send.store import Claim, claim_params, open_store
    from app.models import MessageStatus

    now = clock.now()
    held = Claim(worker, random.getrandbits(62), now + timedelta(seconds=lease_seconds))
    with open_store() as store:
        row = store.claim(claim_params(message.id, message.job_seq, held, now))
    return held if row is not None and row["status"] == MessageStatus.SENDING else None


def record(message, held, outcome):
    """End the claim `held` of `message` with `outcome`, as its send job would; returns what was found after."""
    from app import clock
    from app.messaging.send.store import record_params, record_through_outage

    params = record_params(message.id, message.campaign_id, held, outcome, 500, clock.now())
    return record_through_outage(params, 0)
