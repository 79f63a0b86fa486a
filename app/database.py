"""Time limits on PostgreSQL, and what counts as the database being unavailable.

Three limits keep a request or a job from waiting on PostgreSQL for long:
- `DATABASE_CONNECT_TIMEOUT`, libpq's `connect_timeout`: a server that does not complete a new connection;
- `DATABASE_STATEMENT_TIMEOUT`, the server's `statement_timeout`: a statement that runs too long;
- a deadline on each round trip, `DEADLINE_MARGIN` above the statement timeout: a server that accepted the
  connection and then answers nothing (stopped, hung, or cut off by the network). The kernel keeps
  acknowledging such a connection, so neither limit above fires. A connection that misses its deadline is
  closed, never reused.
Flask CLI commands other than the services in `SERVICE_COMMANDS` (migrations, imports, seeding) run without
the statement timeout and the deadline: they may legitimately run long statements.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from weakref import WeakKeyDictionary

import click
import psycopg
from flask import Flask
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Engine

# Seconds between the server's statement timeout and the client's deadline: a live server cancels the
# statement itself first, and answers with an error the connection survives.
DEADLINE_MARGIN = 1.0
# Flask CLI commands that run as services (Procfile processes) and keep the time limits.
SERVICE_COMMANDS = frozenset({"scheduler"})
# SQLSTATE classes that mean the server cannot serve now: connection exception, insufficient resources
# (too many connections, disk full), operator intervention (statement timeout, shutdown, starting up).
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_SQLITE_UNAVAILABLE = ("unable to open database file", "database is locked", "disk I/O error")
# SET LOCAL statement_timeout, with a bind parameter (SET takes none).
_SET_LOCAL_STATEMENT_TIMEOUT = text("SELECT set_config('statement_timeout', :value, true)")

# A round-trip deadline for the current context (thread) that replaces the connection's own.
_budget: ContextVar[float | None] = ContextVar("round_trip_budget", default=None)


class RoundTripTimeout(psycopg.OperationalError):
    """The server did not answer within the round trip's deadline; the connection has been closed."""


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection that gives up on the server after `deadline` seconds per round trip (None: no
    deadline), or the current `round_trip_budget`. It hooks the one place psycopg waits for the server."""

    deadline: float | None = None

    def wait(self, gen, interval: float = 0.1, timeout: float | None = None):  # psycopg's default interval
        if timeout is not None:  # the caller's own limit (psycopg's `notifies`), handled by the caller
            return super().wait(gen, interval, timeout)
        deadline = _budget.get() or self.deadline
        try:
            return super().wait(gen, interval, deadline)
        except psycopg.errors._WaitTimeout:  # psycopg's own signal that the wait's timeout expired
            # The server may still answer this round trip later: the connection's state is unknown.
            self.pgconn.finish()
            raise RoundTripTimeout(f"no answer from the database within {deadline:g} s; connection closed") from None


@contextmanager
def round_trip_budget(seconds: float) -> Iterator[None]:
    """Within the block, every round trip of this thread gets `seconds` instead of its connection's deadline."""
    token = _budget.set(seconds)
    try:
        yield
    finally:
        _budget.reset(token)


def _limits_apply() -> bool:
    """Whether connections opened now get the statement timeout: in a service process, not in a CLI task."""
    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.info_name in SERVICE_COMMANDS


def _connect(connect_timeout: int, statement_timeout: float, pgbouncer: bool, dialect, conn_rec, cargs, cparams):
    """SQLAlchemy's `do_connect`: open a `DeadlineConnection` with the connect and statement timeouts.
    Behind PgBouncer in transaction mode (`pgbouncer`) a transaction's next one may run on another server
    connection: no statement is prepared on the server, and the statement timeout is the database role's
    (PgBouncer refuses startup options), the client's deadline following this process's setting."""
    if connect_timeout:
        cparams.setdefault("connect_timeout", connect_timeout)
    limited = statement_timeout if statement_timeout and _limits_apply() else None
    if limited and not pgbouncer:
        # A startup option: no extra round trip per connection.
        option = f"-c statement_timeout={round(limited * 1000)}"
        cparams["options"] = f"{cparams['options']} {option}" if cparams.get("options") else option
    connection = DeadlineConnection.connect(*cargs, **cparams)
    connection.deadline = limited + DEADLINE_MARGIN if limited else None
    if pgbouncer:
        connection.prepare_threshold = None
    return connection


def init_app(app: Flask) -> None:
    """Give the app's PostgreSQL engine its time limits (SQLite has none to give)."""
    from app.extensions import db

    with app.app_context():
        engine: Engine = db.engine
    if engine.dialect.driver != "psycopg":
        return
    config = app.config
    listener = partial(
        _connect,
        config["DATABASE_CONNECT_TIMEOUT"],
        config["DATABASE_STATEMENT_TIMEOUT"],
        config["DATABASE_PGBOUNCER"],
    )
    event.listen(engine, "do_connect", listener)
    _bound_ping(engine, config["DATABASE_CONNECT_TIMEOUT"], config["DATABASE_PING_AFTER"])


# Whether the pool pings a connection before handing it out here (see `without_pre_ping`).
_pre_ping: ContextVar[bool] = ContextVar("pre_ping", default=True)


@contextmanager
def without_pre_ping() -> Iterator[None]:
    """Connections checked out of the pool in the block are not pinged first: one round trip less, for a
    caller whose one statement fails fast on a dead connection and who then tries once on a pinged one
    (the short links' redirect)."""
    token = _pre_ping.set(False)
    try:
        yield
    finally:
        _pre_ping.reset(token)


def _bound_ping(engine: Engine, seconds: float, rested: float) -> None:
    """The pool's pre-ping (an empty statement) gets no longer than a new connection would (`seconds`; 0: no
    bound): on a hung server a request then waits for one ping and one connection attempt, not for a
    statement's deadline. Skipped inside `without_pre_ping`, and for a connection back in the pool for less
    than `rested` seconds (`DATABASE_PING_AFTER`): under load, where a connection goes out again within
    milliseconds, the ping was a round trip on every request (a fifth of a delivery receipt's CPU in the
    web process). A server that closed such a connection in that instant fails its first statement instead;
    the request answers 503 like any lost connection (a receipt waits in Redis), and the pool replaces it."""
    ping = engine.dialect.do_ping
    returned: WeakKeyDictionary = WeakKeyDictionary()

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, connection_record) -> None:
        if dbapi_connection is not None:
            returned[dbapi_connection] = time.monotonic()

    def do_ping(dbapi_connection) -> bool:
        if not _pre_ping.get():
            return True
        back = returned.get(dbapi_connection)
        if back is not None and time.monotonic() - back < rested:
            return True
        if not seconds:
            return ping(dbapi_connection)
        with round_trip_budget(min(_budget.get() or seconds, seconds)):
            return ping(dbapi_connection)

    engine.dialect.do_ping = do_ping  # this engine's dialect only


@contextmanager
def statement_budget(session, seconds: float) -> Iterator[None]:
    """Run the block's statements with a statement timeout of `seconds` (to the end of the transaction, on
    PostgreSQL), and a client deadline that follows it."""
    if session.get_bind().dialect.name != "postgresql":
        yield
        return
    session.execute(_SET_LOCAL_STATEMENT_TIMEOUT, {"value": f"{round(seconds * 1000)}ms"})
    with round_trip_budget(seconds + DEADLINE_MARGIN):
        yield


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot serve now (down, unreachable, lost, hung, timed out, full)
    rather than that this request or its data is wrong."""
    if isinstance(error, exc.TimeoutError):  # no pooled connection came free
        return True
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state[:2] in _UNAVAILABLE_CLASSES  # None: the client's side of a connection
    if isinstance(error, sqlite3.OperationalError):
        return str(error).startswith(_SQLITE_UNAVAILABLE)
    return False


def describe(error: BaseException) -> str:
    """A log-safe line about a database error: its class and the driver's first line (libpq's messages
    name the host and user, never the password), without the SQL statement or its parameters."""
    cause = error.orig if isinstance(error, exc.DBAPIError) and error.orig is not None else error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
