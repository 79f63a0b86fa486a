"""`flask up`, the first command a newcomer runs: it starts, says where the key is (never what it is),
keeps the key across restarts, refuses a busy port or a second instance, and stops at once on Ctrl-C.

Each test runs `flask up` as a user would, in a process of its own, on a PostgreSQL database of its own
(with a password in DATABASE_URL, which must never be shown) and an instance folder of its own."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, TEST_DATABASE_URL, ensure_postgres_database

PASSWORD = "hunter2-not-shown"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def up_database_url() -> str:
    """A database of its own for `flask up`, named with a password (trust auth ignores it)."""
    url = make_url(TEST_DATABASE_URL).set(database=make_url(TEST_DATABASE_URL).database + "_up")
    ensure_postgres_database(url.render_as_string(hide_password=False))
    return url.set(password=PASSWORD).render_as_string(hide_password=False)


class Up:
    """A `flask up` process, its output collected in a file."""

    def __init__(self, instance: Path, port: int, database_url: str, log: Path, **settings: str):
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "REDIS_URL", "LOG_LEVEL")}
        env.update(INSTANCE_PATH=str(instance), DATABASE_URL=database_url, **settings)
        with open(log, "wb") as output:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "wsgi", "up", "--port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"flask up exited ({self.proc.returncode}):\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.2)

    def family(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Stop it as Ctrl-C does, so that it cleans up after itself (the embedded Redis's socket folder);
        whatever still runs after a generous wait is killed."""
        family = self.family()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait()


@pytest.fixture
def start_up(tmp_path, up_database_url):
    """Start `flask up` processes; whatever is left of them is killed at the end of the test."""
    started: list[Up] = []

    def start(instance: Path, port: int, **settings: str) -> Up:
        up = Up(instance, port, up_database_url, tmp_path / f"up-{len(started)}.log", **settings)
        started.append(up)
        return up

    yield start
    for up in started:
        up.kill()


def request(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def get(url: str, key: str | None = None, deadline: float = 60) -> int:
    """The status of GET `url`, once it is not a 503: a machine under load may leave a just-started service's
    first database connections waiting past their timeout (a 503 that says so); any other answer is final."""
    until = time.monotonic() + deadline
    while (status := request(url, key)[0]) == 503 and time.monotonic() < until:
        time.sleep(0.5)
    return status


def socket_folder(output: str) -> Path:
    """The folder of the embedded Redis's socket, as `flask up` printed it."""
    return Path(re.search(r"redis: unix://(\S+)/redis\.sock", output).group(1))


def test_up_runs_keeps_its_key_secret_and_stable_and_stops_at_once(tmp_path, start_up):
    """One `flask up` serves every check of a running one (a second on its instance or port, `flask settings`
    beside it) before its Ctrl-C, and its restart."""
    instance, port = tmp_path / "instance", free_port()
    up = start_up(instance, port)
    up.wait_for_output("running: API on")
    key_file = instance / "local-api-key"
    key = key_file.read_text().strip()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert str(key_file) in up.output or "local-api-key" in up.output  # says where the key is...
    assert key not in up.output  # ...never what it is
    assert PASSWORD not in up.output and "***" in up.output
    assert get(f"http://127.0.0.1:{port}/campaigns", key) == 200
    assert up.output.count("API key") == 1

    # A second `flask up` on a busy port or instance fails and changes nothing.
    same_instance = start_up(instance, free_port())
    assert same_instance.proc.wait(timeout=60) != 0
    assert "another `flask up`" in same_instance.output
    other = tmp_path / "other"
    busy_port = start_up(other, port)
    assert busy_port.proc.wait(timeout=60) != 0
    assert "--port" in busy_port.output and "running" not in busy_port.output
    assert not (other / "local-api-key").exists()
    assert key_file.read_text().strip() == key
    assert get(f"http://127.0.0.1:{port}/campaigns", key) == 200

    # `flask settings` beside it shows the Redis it uses.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(INSTANCE_PATH=str(instance), API_KEYS="k")

    def settings() -> str:
        command = [sys.executable, "-m", "flask", "--app", "wsgi", "settings"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return next(line for line in result.stdout.splitlines() if line.startswith("REDIS_URL="))

    sockets = socket_folder(up.output)
    assert settings().startswith(f"REDIS_URL=unix://{sockets}/redis.sock")

    children = up.family()[1:]
    assert sockets.is_dir()
    up.proc.send_signal(signal.SIGINT)  # Ctrl-C
    # STOP_GRACE (2 s) is what it gives its processes; the deadline leaves room for a loaded machine.
    assert up.proc.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "flask up left processes running"
    assert not sockets.exists(), "the embedded Redis's socket folder is left behind"
    assert not (instance / "up.redis-url").exists()
    assert settings() == "REDIS_URL=redis://127.0.0.1:6379/0"  # nothing runs there now: the setting's value

    again = start_up(instance, port)
    again.wait_for_output("running: API on")
    assert key_file.read_text().strip() == key  # the key the user saved still works
    assert get(f"http://127.0.0.1:{port}/campaigns", key) == 200
    assert "seeded" not in again.output  # the sample data was there already: nothing to say


def test_up_exits_non_zero_when_one_of_its_processes_dies(tmp_path, start_up):
    instance, port = tmp_path / "instance", free_port()
    up = start_up(instance, port)
    up.wait_for_output("running: API on")
    children = up.family()[1:]
    sockets = socket_folder(up.output)
    next(p for p in children if "worker.py" in " ".join(p.cmdline())).kill()  # kill -9
    assert up.proc.wait(timeout=30) == 1
    assert "worker exited" in up.output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "flask up left processes running"
    # Its other processes stop quietly: no traceback from one of them losing Redis or its parent.
    assert "Traceback" not in up.output, up.output[-3000:]
    assert not sockets.exists()


def test_up_prints_a_progress_line_per_campaign_instead_of_a_line_per_message(tmp_path, start_up):
    instance, port = tmp_path / "instance", free_port()
    # One send at a time, each taking 1.2 s, to four customers: the campaign sends for 4.8 s, longer than two
    # progress intervals (2 s), so that a line while it sends has a rate.
    up = start_up(instance, port, WORKER_CONCURRENCY="1", MOCK_SENDER_LATENCY="1.2", UP_PROGRESS_INTERVAL="2")
    up.wait_for_output("running: API on")
    key = (instance / "local-api-key").read_text().strip()
    api = f"http://127.0.0.1:{port}"
    assert get(f"{api}/campaigns", key) == 200
    status, campaign = request(
        f"{api}/campaigns", key, {"name": "Launch", "channel": "sms", "base_template": "Hi {first_name}"}
    )
    assert status == 201
    customers = request(f"{api}/customers?page_size=100", key)[1]["data"]
    ids = [customer["id"] for customer in customers][:4]
    assert len(ids) == 4
    assert request(f"{api}/campaigns/{campaign['id']}/send", key, {"customer_ids": ids})[0] == 202
    total = len(ids)
    up.wait_for_output(f"campaign {campaign['id']} 'Launch': {total}/{total} done ({total} sent), sent", timeout=120)
    progress = [line for line in up.output.splitlines() if line.startswith(f"campaign {campaign['id']} ")]
    assert any(line.endswith("/s") for line in progress), progress  # while it sent: done so far, and the rate
    assert len(progress) < 2 * total  # a line every few seconds, not one a message
    assert '"message sent"' not in up.output  # the worker's line per message stays out of the terminal
    assert "Booting worker" not in up.output  # gunicorn's own lines follow the processes' level too
