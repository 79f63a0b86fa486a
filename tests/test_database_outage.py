"""PostgreSQL down, hung or slow: the API answers 503 fast (in the one error shape, with Retry-After),
keys from API_KEYS still authenticate, /health says so within 2 s, and everything recovers by itself.
Faults are injected on a private cluster or an unanswering socket, never on the shared server."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from app.extensions import db
from config import database_url
from tests.conftest import TEST_API_KEY, serve
from tests.factories import make_campaign, make_customers
from tests.pg_server import SilentServer

CLOSED_PORT = 1  # nothing listens there: connections are refused at once
SECRET = "s3cret-password"
KEY = {"Authorization": f"Bearer {TEST_API_KEY}"}


def unreachable_database(app, tmp_path) -> str:
    """A database URL of the test's backend where nothing answers (with a password that must not leak)."""
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        return f"sqlite:///{tmp_path}/missing-dir/db.sqlite"
    return f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{CLOSED_PORT}/campaigns"


def assert_unavailable(response) -> dict:
    assert response.status_code == 503
    assert response.mimetype == "application/json"
    assert response.headers["Retry-After"] == "5"
    body = response.get_json()
    assert body["code"] == 503 and body["status"] == "Service Unavailable"
    assert "database" in body["message"]
    return body


@dataclass
class Answer:
    status: int
    headers: dict
    body: dict
    seconds: float


def http(method: str, url: str, headers: dict | None = None, json_body: dict | None = None) -> Answer:
    """One request over HTTP, 30 s at most: a service that hangs fails the test instead of hanging it."""
    data = json.dumps(json_body).encode() if json_body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, head, raw = error.code, dict(error.headers), error.read()
    return Answer(status, head, json.loads(raw), time.monotonic() - start)


def http_get(url: str, headers: dict | None = None) -> Answer:
    return http("GET", url, headers)


def test_database_down_answers_503_with_retry_after(app, app_with, tmp_path, caplog):
    down = app_with(SQLALCHEMY_DATABASE_URI=unreachable_database(app, tmp_path)).test_client()
    with caplog.at_level(logging.WARNING):
        reading = down.get("/campaigns", headers=KEY)
        writing = down.post(
            "/campaigns",
            json={"name": "Launch", "channel": "sms", "base_template": "Hi"},
            headers={**KEY, "Idempotency-Key": "k1"},
        )
    for response in (reading, writing):
        assert_unavailable(response)
        assert SECRET not in response.get_data(as_text=True)
        assert "X-RateLimit-Limit" in response.headers  # the key was taken, and counted
    assert any(r.getMessage() == "database unavailable" for r in caplog.records)
    assert SECRET not in caplog.text and "SELECT" not in caplog.text


@pytest.mark.parametrize(
    "header, status",
    [
        (f"Bearer {TEST_API_KEY}", 503),  # from API_KEYS: authenticated without the database
        ("Bearer not-a-stored-key", 401),  # stored keys start with cd_: this is no key at all
        ("Bearer cd_perhaps-a-stored-key", 503),  # cannot be told without the database
        (None, 401),
    ],
)
def test_keys_while_the_database_is_down(app, app_with, tmp_path, header, status):
    down = app_with(SQLALCHEMY_DATABASE_URI=unreachable_database(app, tmp_path)).test_client()
    response = down.get("/customers", headers={"Authorization": header} if header else {})
    assert response.status_code == status
    assert response.get_json()["code"] == status


@pytest.mark.real_only
def test_statement_over_the_statement_timeout_is_503(app, app_with, client):
    campaign_id = make_campaign().id
    holder = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    with serve(app_with(DATABASE_STATEMENT_TIMEOUT=1)) as api, holder.connect() as conn:
        # Another transaction holds the campaign: the edit waits for its lock, past the timeout.
        conn.execute(text("SELECT id FROM campaigns WHERE id = :id FOR UPDATE"), {"id": campaign_id})
        answer = http("PATCH", f"{api}/campaigns/{campaign_id}", KEY, {"name": "Later"})
        conn.rollback()
    holder.dispose()
    assert (answer.status, answer.headers["Retry-After"]) == (503, "5")
    assert 0.9 < answer.seconds < 5
    assert client.get(f"/campaigns/{campaign_id}").get_json()["name"] == "Spring sale"


@pytest.mark.real_only
def test_audience_send_gets_a_longer_statement_budget(app, app_with):
    """The send's INSERT ... SELECT may run longer than the statement timeout, and the client's deadline
    follows: here it waits 3 s for a table lock another transaction holds, with a 1 s statement timeout."""
    make_customers(3)
    campaign_id = make_campaign().id
    holder = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    sender = app_with(DATABASE_STATEMENT_TIMEOUT=1, SEND_STATEMENT_TIMEOUT=30)
    with serve(sender) as api, holder.connect() as conn:
        conn.execute(text("LOCK TABLE outbound_messages IN SHARE MODE"))  # no insert until it is released
        release = threading.Timer(3, conn.rollback)
        release.start()
        answer = http("POST", f"{api}/campaigns/{campaign_id}/send", KEY, {"audience": {"all": True}})
        release.join()
    holder.dispose()
    assert answer.status == 202, answer.body
    assert answer.body["messages_queued"] == 3
    assert answer.seconds > 2.5


@pytest.mark.real_only
def test_cli_commands_run_without_the_statement_timeout(app, runner):
    @app.cli.command("show-statement-timeout")
    def show() -> None:
        print(db.session.scalar(text("SHOW statement_timeout")))

    db.engine.dispose()  # connections opened from here on
    assert runner.invoke(args=["show-statement-timeout"]).output.strip() == "0"
    db.session.remove()
    db.engine.dispose()
    assert db.session.scalar(text("SHOW statement_timeout")) == "5s"  # the web and worker processes


@pytest.mark.real_only
def test_hung_database_fails_fast_and_the_service_recovers(private_app, pg_server):
    with serve(private_app) as api:
        assert http_get(f"{api}/campaigns", KEY).status == 200  # the pool now holds a connection
        pg_server.pause()
        try:
            for _ in range(2):  # on the pooled connection, then on a new one
                answer = http_get(f"{api}/campaigns", KEY)
                assert (answer.status, answer.body["code"], answer.headers["Retry-After"]) == (503, 503, "5")
                assert answer.seconds < 10  # a ping and a connection attempt, 3 s each
            health = http_get(f"{api}/health")
            assert health.status == 503
            assert health.body["database"] == {"ok": False, "error": "database unreachable"}
            assert health.seconds < 2
        finally:
            pg_server.resume()
        assert http_get(f"{api}/campaigns", KEY).status == 200  # the first request after it is back
        assert http_get(f"{api}/health").body["database"] == {"ok": True}


@pytest.mark.real_only
def test_server_that_stops_answering_mid_statement_is_given_up_and_its_connection_dropped(
    app_with, private_database, pg_server
):
    app = app_with(SQLALCHEMY_DATABASE_URI=database_url(private_database), DATABASE_STATEMENT_TIMEOUT=1)
    with app.app_context(), db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        pg_server.pause()  # the server cannot cancel anything now: only the client's deadline ends the wait
        try:
            start = time.monotonic()
            with pytest.raises(OperationalError) as caught:
                conn.execute(text("SELECT 1"))
            elapsed = time.monotonic() - start
        finally:
            pg_server.resume()
        assert "no answer from the database within 2 s" in str(caught.value)  # statement timeout + 1 s
        assert 1.5 < elapsed < 5
        assert caught.value.connection_invalidated  # closed, never given back to the pool
    with app.app_context(), db.engine.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1


@pytest.mark.real_only
def test_database_that_accepts_and_never_answers(app_with):
    silent = SilentServer()
    try:
        with serve(app_with(SQLALCHEMY_DATABASE_URI=database_url(silent.url()))) as api:
            answer = http_get(f"{api}/campaigns", KEY)
            assert (answer.status, answer.headers["Retry-After"]) == (503, "5")
            assert answer.seconds < 10
            health = http_get(f"{api}/health")
            assert health.status == 503 and health.seconds < 2
    finally:
        silent.close()


@pytest.mark.real_only
def test_stopped_database_answers_503_and_the_service_recovers_when_it_is_back(private_app, pg_server):
    with serve(private_app) as api:
        assert http_get(f"{api}/campaigns", KEY).status == 200
        pg_server.stop()
        try:
            for _ in range(2):  # on the pooled connection, then on a new one
                answer = http_get(f"{api}/campaigns", KEY)
                assert (answer.status, answer.body["code"], answer.headers["Retry-After"]) == (503, 503, "5")
            assert http_get(f"{api}/health").body["database"] == {"ok": False, "error": "database unreachable"}
        finally:
            pg_server.start()
        assert http_get(f"{api}/campaigns", KEY).status == 200
        assert http_get(f"{api}/health").status == 200


@pytest.mark.real_only
def test_a_connection_back_in_the_pool_for_a_moment_is_not_pinged_and_a_rested_one_is(app, app_with):
    """DATABASE_PING_AFTER: the pool's pre-ping is a round trip, skipped for a connection that came back a
    moment ago (under load, every request's). Seen from outside: a server-side close within the window
    fails the next statement on that connection; after the window the ping finds it closed and the pool
    hands out a new one."""
    other = app_with(DATABASE_PING_AFTER=2)
    killer = create_engine(app.config["SQLALCHEMY_DATABASE_URI"], pool_size=1)

    def close_on_the_server(pid: int) -> None:
        with killer.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
            conn.commit()

    with other.app_context():
        engine = db.engine
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        close_on_the_server(pid)  # back in the pool under a second ago: handed out as it is
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT 1"))

        with engine.connect() as conn:  # the pool replaced the lost one
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        close_on_the_server(pid)
        time.sleep(2.2)  # rested past DATABASE_PING_AFTER: pinged first, found closed, replaced
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    killer.dispose()
