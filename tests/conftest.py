"""Fixtures. Every test that takes `app` runs twice: `fast` (SQLite + fakeredis) and `real`
(PostgreSQL + Redis from TEST_DATABASE_URL / TEST_REDIS_URL). `TEST_BACKENDS=fast` runs only the first.
A real service that cannot be reached fails the run; it is never skipped."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
from flask_migrate import upgrade
from redis import Redis
from rq import Queue
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from app import clock as app_clock
from app import create_app
from app.extensions import db
from app.logs import JsonFormatter
from app.messaging.app_worker import build_worker
from config import check_settings, database_url
from tests.helpers import free_port, procfile_command
from tests.pg_server import PgServer
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = str(ROOT / "migrations")
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/campaigns_test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _for_xdist_worker(database: str, redis: str) -> tuple[str, str]:
    """The test database and Redis of this pytest-xdist worker (`pytest -n 2`): worker gwN runs on the database
    named with `_gwN` appended and on the Redis database N below the one named (gw0 on those named)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    if not worker:
        return database, redis
    url = make_url(database)
    database = url.set(database=f"{url.database}_gw{worker}").render_as_string(hide_password=False)
    parts = urlsplit(redis)
    number = int(parts.path.strip("/") or 0) - worker
    if number < 0:
        raise pytest.UsageError(f"TEST_REDIS_URL names Redis database {number + worker}: too low for worker gw{worker}")
    return database, urlunsplit(parts._replace(path=f"/{number}"))


TEST_DATABASE_URL, TEST_REDIS_URL = _for_xdist_worker(TEST_DATABASE_URL, TEST_REDIS_URL)
BACKENDS = [b.strip() for b in os.environ.get("TEST_BACKENDS", "fast,real").split(",") if b.strip()]

if os.environ.get("CI") and "real" not in BACKENDS:
    raise pytest.UsageError("CI must run the real backend: TEST_BACKENDS has no 'real'")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_only: needs real PostgreSQL and Redis (worker processes, row locks)")


def pytest_collection_modifyitems(config, items):
    """`real_only` tests are not collected for the fast backend (deselected, not skipped)."""
    fast = [i for i in items if i.get_closest_marker("real_only") and "[fast" in i.nodeid]
    if fast:
        config.hook.pytest_deselected(items=fast)
        items[:] = [i for i in items if i not in fast]


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a failed run: every test must run against the real services."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; every test must run here", red=True)
        session.exitstatus = 1


# The key the test client sends by default (see the `client` fixture).
TEST_API_KEY = "test-key"

TEST_OVERRIDES = {
    "TESTING": True,
    "API_KEYS": [TEST_API_KEY],
    "RETRY_INTERVALS": [0, 0, 0],  # retries run at once, inside one burst
    "MOCK_SENDER_FAILURE_RATE": 0.0,
    "MOCK_SENDER_FAIL_ATTEMPTS": 0,
    "LOG_LEVEL": "WARNING",
}


def ensure_postgres_database(url: str) -> None:
    """Create the test database if it is missing (the server must be up: a connection error fails)."""
    target = make_url(database_url(url))
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}):
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()


def _migrated(uri: str) -> None:
    app = create_app("config.Config", {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": uri})
    with app.app_context():
        if uri.startswith("postgresql"):
            db.session.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            db.session.commit()
        upgrade(directory=MIGRATIONS)
        db.engine.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    """`fast` or `real`: which database and Redis the tests run against."""
    return request.param


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    _migrated(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_uri() -> str:
    """The real test database, migrated from scratch once per run."""
    ensure_postgres_database(TEST_DATABASE_URL)
    uri = database_url(TEST_DATABASE_URL)
    _migrated(uri)
    return uri


@pytest.fixture
def database_uri(backend, request, tmp_path) -> str:
    """A clean database for one test."""
    if backend == "fast":
        path = tmp_path / "test.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    uri = request.getfixturevalue("postgres_uri")
    engine = create_engine(uri)
    with engine.begin() as conn:
        empty_postgres_tables(conn)
    engine.dispose()
    return uri


# A table with more rows than this is emptied by TRUNCATE; fewer are deleted (a TRUNCATE costs about 5 ms a
# table, whatever its size: most of a real test's set-up when every table took one).
DELETE_AT_MOST = 1000


def empty_postgres_tables(conn) -> None:
    """Every table the models define empty (a new one is emptied between tests without being named here), and
    every sequence of theirs starting again at 1, as `TRUNCATE ... RESTART IDENTITY` leaves them."""
    tables = list(db.metadata.tables)
    counts = conn.execute(
        text(
            " UNION ALL ".join(
                f"SELECT '{t}', (SELECT count(*) FROM (SELECT FROM {t} LIMIT {DELETE_AT_MOST + 1}) r)" for t in tables
            )
        )
    ).all()
    if any(rows > DELETE_AT_MOST for _, rows in counts):
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        return
    used = [table for table, rows in counts if rows]
    if used:
        # No trigger and no foreign key check while the rows go (the message counts' triggers would write
        # rows of their own): every table's rows go, in any order.
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for table in used:
            conn.execute(text(f"DELETE FROM {table}"))
        conn.execute(text("SET LOCAL session_replication_role = origin"))
    sequences = conn.scalars(
        text("SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema() AND last_value IS NOT NULL")
    ).all()
    for sequence in sequences:
        conn.execute(text(f'ALTER SEQUENCE "{sequence}" RESTART'))


@pytest.fixture
def redis_conn(backend):
    """An empty Redis: fakeredis, or the real server's test database (TEST_REDIS_URL), flushed."""
    if backend == "fast":
        conn = fakeredis.FakeRedis()
    else:
        conn = Redis.from_url(TEST_REDIS_URL)
        conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture
def send_queue(app, redis_conn) -> Queue:
    """The queue of send jobs, named as the app names it (SEND_QUEUE)."""
    return Queue(app.config["SEND_QUEUE"], connection=redis_conn)


@pytest.fixture
def control_queue(app, redis_conn) -> Queue:
    """The queue of campaign-level jobs (CONTROL_QUEUE): fan-out, dispatch, reconcile, imports."""
    return Queue(app.config["CONTROL_QUEUE"], connection=redis_conn)


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of the test's own, on its own port, for a test to stop, stall or flush."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def send_log(tmp_path) -> Path:
    """The mock sender's log: one JSON line per attempt that reached the sender."""
    return tmp_path / "sends.jsonl"


@pytest.fixture
def rate_limit_storage(backend) -> str:
    """Where the rate limiter counts: in memory, or in the real test Redis."""
    return "memory://" if backend == "fast" else TEST_REDIS_URL


@pytest.fixture
def app(database_uri, redis_conn, send_log, rate_limit_storage):
    """The app on a clean database and an empty Redis, accepting `TEST_API_KEY`."""
    app = create_app(
        "config.Config",
        {
            **TEST_OVERRIDES,
            "SQLALCHEMY_DATABASE_URI": database_uri,
            "MOCK_SENDER_LOG": str(send_log),
            "RATELIMIT_STORAGE_URI": rate_limit_storage,
        },
    )
    app.extensions["redis"] = redis_conn
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    """A test client for the app that sends `TEST_API_KEY` unless a request says otherwise."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TEST_API_KEY}"
    return client


@pytest.fixture
def anonymous_client(app):
    """A test client that sends no API key."""
    return app.test_client()


@contextmanager
def serve(app):
    """Serve `app` over HTTP on a free local port (a threaded werkzeug server); yields its base URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def live_server(app):
    """The app served over HTTP on a free local port; yields its base URL."""
    with serve(app) as url:
        yield url


@pytest.fixture
def app_with(database_uri, redis_conn, send_log, rate_limit_storage):
    """Build another app on the test's database and Redis, with settings of its own (read when an app is
    built, such as the database's time limits); each is disposed of at the end of the test."""
    built = []

    def build(**overrides):
        other = create_app(
            "config.Config",
            {
                **TEST_OVERRIDES,
                "SQLALCHEMY_DATABASE_URI": database_uri,
                "MOCK_SENDER_LOG": str(send_log),
                "RATELIMIT_STORAGE_URI": rate_limit_storage,
                **overrides,
            },
        )
        other.extensions["redis"] = redis_conn
        built.append(other)
        return other

    yield build
    for other in built:
        with other.app_context():
            db.engine.dispose()


@pytest.fixture(scope="session")
def pg_server():
    """A private PostgreSQL cluster for fault tests (initdb once per run): stop, start, pause it at will."""
    server = PgServer()
    server.init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def private_database(pg_server) -> str:
    """A migrated, empty database on the private cluster (its URL); the cluster is up again afterwards."""
    if not pg_server.running:
        pg_server.start()
    url = pg_server.create_database("campaigns")
    _migrated(database_url(url))
    yield url
    if pg_server.running:
        pg_server.resume()
    else:
        pg_server.start()


@pytest.fixture
def private_app(private_database, redis_conn, send_log, rate_limit_storage):
    """The app on the private cluster's database and the test Redis, accepting `TEST_API_KEY`."""
    app = create_app(
        "config.Config",
        {
            **TEST_OVERRIDES,
            "SQLALCHEMY_DATABASE_URI": database_url(private_database),
            "MOCK_SENDER_LOG": str(send_log),
            "RATELIMIT_STORAGE_URI": rate_limit_storage,
        },
    )
    app.extensions["redis"] = redis_conn
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def runner(app):
    """A runner for the app's CLI commands."""
    return app.test_cli_runner()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.current = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, **kwargs) -> None:
        self.current += timedelta(**kwargs)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Replace the service's clock with one the test controls."""
    fake = Clock()
    monkeypatch.setattr(app_clock, "now", fake.now)
    return fake


@pytest.fixture
def work(app):
    """Process every queued job with a real RQ worker in burst mode, in this process."""

    def run(queue_names: list[str] | None = None) -> None:
        build_worker(app, queue_names).work(burst=True, logging_level="WARNING")
        db.session.rollback()  # end the test's transaction: its next read sees what the worker wrote

    return run


@pytest.fixture
def worker_env(backend, send_log) -> dict:
    """Environment for worker processes started as the Procfile starts them (real backend only)."""
    assert backend == "real", "worker processes need the real backend"
    return {
        **os.environ,
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": TEST_REDIS_URL,
        "RETRY_INTERVALS": "0,0,0",
        "MOCK_SENDER_LOG": str(send_log),
        "LOG_LEVEL": "WARNING",
        "API_KEYS": TEST_API_KEY,
    }


@pytest.fixture
def spawn_command(worker_env, tmp_path):
    """Start a command (a full argv) against the real backend with extra settings; killed at the
    end of the test, with any process it forked.

    Its stdout and stderr go to files, read back through `proc.stdout` and `proc.stderr`: a pipe nobody
    drains until the process exits would block a chatty process once the pipe's 64 KB buffer is full."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], **env) -> subprocess.Popen:
        out, err = tmp_path / f"stdout-{len(started)}.log", tmp_path / f"stderr-{len(started)}.log"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**worker_env, **{k: str(v) for k, v in env.items()}},
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group, RQ's forked scheduler included
            )
        proc.stdout, proc.stderr = open(out, "rb"), open(err, "rb")  # closed at teardown
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def spawn(spawn_command):
    """Start a Python process of the service (`worker.py`, `-m flask scheduler`) against the real backend."""

    def start(args: list[str], **env) -> subprocess.Popen:
        return spawn_command([sys.executable, *args], **env)

    return start


@pytest.fixture
def spawn_web_process(spawn_command):
    """Start the Procfile's `web` command, as written there, on a free port; returns the process and its
    base URL once it answers."""

    def start(**env) -> tuple[subprocess.Popen, str]:
        port = free_port()
        # The Procfile names `gunicorn`: the one installed beside this Python.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = spawn_command(["bash", "-c", "exec " + procfile_command("web")], PORT=port, PATH=path, **env)
        return proc, wait_for_port(proc, port)

    return start


@pytest.fixture
def spawn_web(spawn_web_process):
    """Start the Procfile's `web` command, as written there, on a free port; returns its base URL once
    it answers."""

    def start(**env) -> str:
        return spawn_web_process(**env)[1]

    return start


def wait_for_port(proc: subprocess.Popen, port: int, timeout: float = 90) -> str:
    """The base URL of `proc` once it listens on `port`; fail if it exits or does not listen in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the process did not start listening within {timeout} s")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a process started by `spawn` and every process it forked, as a machine's death would."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def spawn_worker(spawn):
    """Start `python worker.py` (with `--burst` unless told otherwise), as the Procfile does."""

    def start(burst: bool = True, **env) -> subprocess.Popen:
        return spawn([str(ROOT / "worker.py")] + (["--burst"] if burst else []), **env)

    return start


@pytest.fixture
def spawn_scheduler(spawn):
    """Start `flask scheduler`, as the Procfile does."""

    def start(**env) -> subprocess.Popen:
        return spawn(["-m", "flask", "--app", "wsgi", "scheduler"], **env)

    return start


def wait_for(predicate, timeout: float, interval: float = 0.2) -> None:
    """Poll `predicate` until it holds (each poll in a fresh transaction); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        db.session.rollback()
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def read_send_log(path: Path) -> list[dict]:
    """The attempts the mock sender saw, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def fake_providers(live_server):
    """The local fake of Africa's Talking, Twilio and the WhatsApp Cloud API (a real HTTP server), posting
    its receipts to the app served by `live_server`."""
    from tests.fake_providers import FakeProviders

    with FakeProviders() as fake:
        fake.callback_base_url = live_server
        yield fake


@pytest.fixture
def use_provider(app, fake_providers, live_server):
    """Point the app at the fake provider named (`africastalking`, `twilio` or `whatsapp_cloud`), with its
    credentials and the webhooks' secrets, as an operator's settings would."""

    def configure(name: str, **settings) -> None:
        fake = fake_providers
        app.config.update(
            SMS_PROVIDER=name if name in ("africastalking", "twilio") else app.config["SMS_PROVIDER"],
            WHATSAPP_PROVIDER=name if name == "whatsapp_cloud" else app.config["WHATSAPP_PROVIDER"],
            PUBLIC_BASE_URL=live_server,
            WEBHOOK_TOKEN=fake.webhook_token,
            AFRICASTALKING_USERNAME=fake.at_username,
            AFRICASTALKING_API_KEY=fake.at_api_key,
            AFRICASTALKING_BASE_URL=fake.base_url,
            TWILIO_ACCOUNT_SID=fake.twilio_account_sid,
            TWILIO_AUTH_TOKEN=fake.twilio_auth_token,
            TWILIO_FROM=fake.twilio_service_from,
            TWILIO_BASE_URL=fake.base_url,
            WHATSAPP_ACCESS_TOKEN=fake.whatsapp_access_token,
            WHATSAPP_PHONE_NUMBER_ID=fake.whatsapp_phone_number_id,
            WHATSAPP_APP_SECRET=fake.whatsapp_app_secret,
            WHATSAPP_VERIFY_TOKEN="verify-me",
            WHATSAPP_BASE_URL=fake.base_url,
            **settings,
        )
        app.extensions.pop("providers", None)  # built again from these settings
        check_settings(app.config)

    return configure


@pytest.fixture
def log_lines():
    """JSON lines logged at INFO and above while the test runs, as the service formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)
