"""The Procfile's web process (gunicorn): slow or stalled clients do not block other clients, a stalled
client does not hold a thread for good, and a long request is not killed by gunicorn's worker timeout."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_API_KEY, kill_group
from tests.pg_server import free_port, wait_until

pytestmark = pytest.mark.real_only


def procfile_command(process: str) -> str:
    """The command the Procfile runs for `process`."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            return command.strip()
    raise AssertionError(f"no {process!r} process in the Procfile")


def get(port: int, path: str, timeout: float = 30) -> tuple[int, float]:
    """GET `path`; returns the status and the seconds it took."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    finally:
        conn.close()
    return status, time.monotonic() - start


@pytest.fixture
def web(worker_env, tmp_path):
    """Start the Procfile's web process; yields a function that starts it with extra settings and
    returns its port once it answers."""
    started = []

    def start(**env) -> int:
        port = free_port()
        environment = {
            **worker_env,
            "PORT": str(port),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            **{k: str(v) for k, v in env.items()},
        }
        with open(tmp_path / f"web-{len(started)}.log", "wb") as log:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {procfile_command('web')}"],
                cwd=ROOT,
                env=environment,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        started.append(proc)

        def answers() -> bool:
            try:
                return get(port, "/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=90)
        return port

    yield start
    for proc in started:
        kill_group(proc)


def stall_mid_headers(port: int) -> socket.socket:
    """A client that sends part of its request line and headers, then nothing."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return client


def stall_mid_body(port: int) -> socket.socket:
    """An authenticated POST that announces 100 bytes of body and sends 1."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TEST_API_KEY}\r\nContent-Length: 100\r\n\r\n{{".encode()
    )
    return client


@pytest.mark.parametrize("mid_headers, mid_body", [(4, 0), (0, 4), (4, 4), (8, 4)])
def test_health_answers_beside_stalled_clients(app, web, mid_headers, mid_body):
    # The stalled clients hold their threads for a minute: a health check queued behind them would wait
    # that long, twice the bound below, which leaves room for a loaded machine.
    port = web(WEB_CLIENT_TIMEOUT=60)
    stalled = [stall_mid_headers(port) for _ in range(mid_headers)]
    stalled += [stall_mid_body(port) for _ in range(mid_body)]
    try:
        time.sleep(1)  # every stalled request has reached a worker and is waiting for its client
        for _ in range(3):
            status, seconds = get(port, "/health")
            assert status == 200
            assert seconds < 30
    finally:
        for client in stalled:
            client.close()


def read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    return answer


def test_stalled_clients_are_dropped_after_the_client_timeout(app, web):
    port = web(WEB_CLIENT_TIMEOUT=1)
    mid_headers, mid_body = stall_mid_headers(port), stall_mid_body(port)
    try:
        mid_headers.settimeout(20)
        mid_body.settimeout(20)
        start = time.monotonic()
        read_until_closed(mid_headers)
        body_answer = read_until_closed(mid_body)
        assert time.monotonic() - start < 10  # 1 s without progress, and some slack
    finally:
        mid_headers.close()
        mid_body.close()
    # The stalled body is answered in the error shape (if the client still reads), never with a 500.
    assert body_answer.startswith(b"HTTP/1.1 400"), body_answer[:200]
    assert b"stopped arriving" in body_answer


def test_request_longer_than_the_worker_timeout_completes(app, web):
    """gunicorn kills a worker that is silent for `--timeout` seconds; a slow but steady upload takes
    longer than that and must still be answered."""
    port = web(GUNICORN_CMD_ARGS="--timeout 2")
    body = b'{"phone": "0712345678", "first_name": "Slow"}'
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        client.sendall(
            b"POST /customers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TEST_API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        start = time.monotonic()
        for i in range(0, len(body), 8):  # about 5 s in all: over the 2 s worker timeout
            client.sendall(body[i : i + 8])
            time.sleep(0.9)
        assert time.monotonic() - start > 4
        status_line = client.recv(65536).split(b"\r\n", 1)[0]
    finally:
        client.close()
    assert status_line.startswith(b"HTTP/1.1 201 "), status_line
