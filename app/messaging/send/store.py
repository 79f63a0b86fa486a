"""The send job's reads and writes: two short transactions around the provider call, none across it.

A send first claims its message (`lifecycle.CLAIM`: queued -> sending, with a lease, if its campaign is
sending), loading what it renders from in the same statement, and commits. It then gives its connection
back to the pool: nothing is held while it waits for its throughput slot or for the provider. It ends the
claim by recording what came of it (`lifecycle.RECORD`, naming the claim), commits, and reads what is left
to do: its campaign's window (`lifecycle.WINDOW_STATE`) and any receipt that came before its record. On
PostgreSQL each statement is its own transaction (autocommit: no BEGIN or COMMIT to send), three round
trips in all; elsewhere (SQLite) the same statements run through the session. A store is a context
manager: leaving it ends its transaction and gives its connection back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, Self

import psycopg
from flask import current_app
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from redis.exceptions import RedisError
from sqlalchemy import and_, bindparam, case, exists, null, select
from sqlalchemy.engine import Compiled
from sqlalchemy.orm import aliased

from app import metrics
from app.database import describe, is_unavailable
from app.extensions import db
from app.messaging import spool
from app.messaging.lifecycle import CLAIM, RECORD, WINDOW_STATE
from app.models import (
    Campaign,
    Customer,
    CustomerOptOut,
    DeliveryReceipt,
    MessageStatus,
    OutboundMessage,
    message_channel,
)
from app.queues import get_redis

log = logging.getLogger(__name__)


def _load(claimed):
    """What a send renders and decides from, for the message `claimed` names (a table or the claim's CTE). A
    fallback (`fallback_for`) goes by SMS with its campaign's `sms_fallback` template, whatever the campaign's
    channel (app.messaging.fallback)."""
    is_fallback = claimed.c.fallback_for.is_not(None)
    channel = message_channel(claimed.c.fallback_for, Campaign.channel)
    replaced = aliased(OutboundMessage)
    return (
        select(
            claimed.c.id,
            claimed.c.status,
            claimed.c.retry_count,
            claimed.c.campaign_id,
            claimed.c.customer_id,
            claimed.c.fallback_for,
            # Its A/B variant, and the campaign's variants: the job renders it from its variant's template.
            claimed.c.variant,
            Campaign.variants,
            # A customer who opted out of the channel after the message was queued is not messaged: the
            # message is canceled instead (one primary-key probe, in the same round trip).
            exists()
            .where(and_(CustomerOptOut.customer_id == claimed.c.customer_id, CustomerOptOut.channel == channel))
            .label("opted_out"),
            # A fallback whose WhatsApp message was delivered after all (a late receipt) is not sent.
            exists()
            .where(replaced.id == claimed.c.fallback_for, replaced.status == MessageStatus.DELIVERED)
            .label("replaced_delivered"),
            Campaign.status.label("campaign_status"),
            channel.label("channel"),
            case((is_fallback, Campaign.sms_fallback["base_template"].as_string()), else_=Campaign.base_template).label(
                "base_template"
            ),
            case((is_fallback, null()), else_=Campaign.whatsapp_template).label("whatsapp_template"),
            # What a failure of a WhatsApp message may trigger (app.messaging.fallback).
            Campaign.sms_fallback,
            # Whether QUIET_HOURS hold this message (checked before the throughput slot).
            Campaign.respect_quiet_hours,
            Campaign.priority,
            # Whether its URLs become short links (app.links).
            Campaign.track_links,
            Customer.phone,
            Customer.first_name,
            Customer.last_name,
            Customer.location,
            Customer.preferred_product,
            Customer.attributes,
        )
        .select_from(claimed)
        .join(Campaign, Campaign.id == claimed.c.campaign_id)
        .outerjoin(Customer, Customer.id == claimed.c.customer_id)
    )


# PostgreSQL: the claim and the load in one statement (the UPDATE's RETURNING feeds the SELECT).
CLAIM_AND_LOAD = _load(CLAIM.cte("claimed"))
# SQLite (its RETURNING cannot feed a SELECT): the load after the claim, by id.
_MESSAGES = OutboundMessage.__table__
LOAD_CLAIMED = _load(_MESSAGES).where(_MESSAGES.c.id == bindparam("message_id"))
CAMPAIGN_STATUS = select(Campaign.status).where(Campaign.id == bindparam("campaign_id"))
# A receipt that arrived before the provider id it names was recorded (a fast provider beats the record).
WAITING_RECEIPT = (
    select(DeliveryReceipt.id)
    .where(
        DeliveryReceipt.provider == bindparam("provider"),
        DeliveryReceipt.provider_message_id == bindparam("provider_message_id"),
    )
    .limit(1)
)


_STATE = WINDOW_STATE.subquery()
# What a send reads after its record: its campaign's window, and whether a receipt came for the provider id
# it just recorded (a fast provider beats the record). One statement; no receipt when it recorded no id.
AFTER_RECORD = select(
    _STATE.c.in_window, _STATE.c.pending, WAITING_RECEIPT.exists().label("receipt_waiting")
).select_from(_STATE)


@dataclass(frozen=True)
class Claim:
    """Who claims a message, until when, and the token that names this claim (its record must name it)."""

    worker: str
    token: int
    lease_until: datetime


@dataclass(frozen=True)
class Outcome:
    """What a claim ends in: the message's new status (`queued` again for a retry or a hand-back, `pending`
    when it is held), the retries it has used, the body sent (and its SMS segments), what the provider
    said (its name and message id when it took it; the error, its code and class when it did not), and
    until when a held message waits (`not_before`)."""

    status: str
    retries_used: int
    body: str | None = None
    error: str | None = None
    error_code: str | None = None
    error_class: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    retry_after: float | None = None  # a throttled attempt: seconds the provider asked to wait (not stored)
    segments: int | None = None  # an SMS body's segments; None for WhatsApp, or when nothing was rendered
    recipient_opted_out: bool = False  # the provider says the recipient opted out with it (not stored)
    not_before: datetime | None = None  # held by quiet hours until then
    hand_back: float | None = None  # the job runs again after this many seconds (no slot, throttled): no retry used
    links: list[str] | None = None  # the original URLs of the body's short links, by position (app.links)


@dataclass(frozen=True)
class Recorded:
    """What the record found after its commit."""

    recorded: bool  # the claim still held the message, and its outcome is now the message's
    in_window: int  # the campaign's messages queued or sending (counted up to the window's size)
    pending: bool  # the campaign has messages waiting for a refill (or for quiet hours to end)
    receipt_waiting: bool  # a receipt for the provider id just recorded is waiting to be applied
    deferred: bool = False  # the database was unavailable: the record waits in Redis (nothing else is known)


def record_params(message_id: int, campaign_id: int, claim: Claim, outcome: Outcome, cap: int, now: datetime) -> dict:
    """The bind parameters of `RECORD`, `WINDOW_STATE` and `WAITING_RECEIPT`, named in this one place."""
    return {
        "message_id": message_id,
        "campaign_id": campaign_id,
        "token": claim.token,
        "new_status": outcome.status,
        "body": outcome.body,
        "segments": outcome.segments,
        "links": outcome.links,
        "error": outcome.error,
        "error_code": outcome.error_code,
        "error_class": outcome.error_class,
        "retries_used": outcome.retries_used,
        "provider": outcome.provider,
        "provider_message_id": outcome.provider_message_id,
        "not_before": outcome.not_before,
        "cap": cap,
        "now": now,
    }


def claim_params(message_id: int, job_seq: int, claim: Claim, now: datetime) -> dict:
    return {
        "message_id": message_id,
        "queued_seq": job_seq,
        "worker": claim.worker,
        "token": claim.token,
        "lease": claim.lease_until,
        "now": now,
    }


class MessageStore(Protocol):
    def claim(self, params: dict) -> dict | None:
        """Claim the message for this job and commit; its fields (`status` says what the claim did:
        `sending`, or `pending`/`canceled` when its campaign is paused or canceled), or None when it was
        not queued for this job."""

    def campaign_status(self, campaign_id: int) -> str | None:
        """The campaign's status now."""

    def record(self, params: dict) -> Recorded:
        """End the claim with its outcome, commit, and say what is left to do after it."""

    def close(self) -> None:
        """End the transaction if one is open (rolled back) and give the connection back; idempotent."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info) -> None: ...


class _ClosedOnExit:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SessionStore(_ClosedOnExit):
    """Through the session: for SQLite, where round trips cost nothing."""

    def claim(self, params: dict) -> dict | None:
        connection = db.session.connection()
        claimed = connection.execute(CLAIM, params).first()
        if claimed is None:
            db.session.commit()
            return None
        row = connection.execute(LOAD_CLAIMED, params).one()._asdict()
        db.session.commit()
        return row

    def campaign_status(self, campaign_id: int) -> str | None:
        status = db.session.connection().execute(CAMPAIGN_STATUS, {"campaign_id": campaign_id}).scalar()
        db.session.commit()
        return status

    def record(self, params: dict) -> Recorded:
        recorded = db.session.connection().execute(RECORD, params).rowcount == 1
        db.session.commit()
        state = db.session.connection().execute(AFTER_RECORD, params).one()
        db.session.commit()
        return Recorded(recorded, state.in_window, bool(state.pending), bool(state.receipt_waiting))

    def close(self) -> None:
        db.session.rollback()


_compiled: dict[str, Compiled] = {}


def _sql(name: str, statement, params: dict) -> tuple[str, dict]:
    """`statement` as psycopg SQL with named parameters (compiled once per process), and `params`
    completed with the statement's own constants."""
    if name not in _compiled:
        _compiled[name] = statement.compile(dialect=db.engine.dialect)
    compiled = _compiled[name]
    return compiled.string, {**compiled.params, **params}


class PsycopgStore(_ClosedOnExit):
    """Raw psycopg, each statement committing by itself. (psycopg's pipeline mode would save the record's
    second round trip, but its wait for results cost the worker more CPU than the round trip it saved.)
    Its statements are prepared on the server, but not behind PgBouncer in transaction mode
    (`DATABASE_PGBOUNCER`), where a transaction's next one may run on another server connection."""

    def __init__(self) -> None:
        self._prepare = not current_app.config["DATABASE_PGBOUNCER"]
        self._pooled = db.engine.raw_connection()
        self._conn = self._pooled.driver_connection
        self._cursor = self._conn.cursor(row_factory=dict_row)

    def claim(self, params: dict) -> dict | None:
        with self._autocommit():  # one statement: its own transaction, no BEGIN or COMMIT to send
            self._cursor.execute(*_sql("claim", CLAIM_AND_LOAD, params), prepare=self._prepare)
            return self._cursor.fetchone()

    def campaign_status(self, campaign_id: int) -> str | None:
        with self._autocommit():
            self._cursor.execute(
                *_sql("campaign", CAMPAIGN_STATUS, {"campaign_id": campaign_id}), prepare=self._prepare
            )
            row = self._cursor.fetchone()
        return None if row is None else row["status"]

    @contextlib.contextmanager
    def _autocommit(self) -> Iterator[None]:
        """The block's statements each commit by themselves; the pooled connection goes back as it came."""
        self._conn.autocommit = True
        try:
            yield
        finally:
            if not self._conn.closed:
                self._conn.autocommit = False

    def record(self, params: dict) -> Recorded:
        if params.get("links") is not None:  # SQLAlchemy's JSON type is not in this path: psycopg's adapter is
            params = {**params, "links": Jsonb(params["links"])}
        with self._autocommit():
            self._cursor.execute(*_sql("record", RECORD, params), prepare=self._prepare)
            recorded = self._cursor.rowcount == 1
            # After the record's commit: it sees every commit before it (two sends ending a campaign's last
            # messages at once: the later one sees both).
            self._cursor.execute(*_sql("after", AFTER_RECORD, params), prepare=self._prepare)
            state = self._cursor.fetchone()
        return Recorded(recorded, state["in_window"], state["pending"], state["receipt_waiting"])

    def close(self) -> None:
        if self._pooled is None:
            return  # closed already
        pooled, self._pooled = self._pooled, None
        self._cursor.close()
        try:
            if not self._conn.closed:
                self._conn.rollback()
        except psycopg.Error:
            pass  # the connection failed: it is not given back, below
        if self._conn.closed:
            pooled.invalidate()  # lost, or closed at a missed deadline: never reused
        else:
            pooled.close()  # back to the pool


def open_store() -> MessageStore:
    return PsycopgStore() if db.engine.dialect.driver == "psycopg" else SessionStore()


# Seconds between two tries at recording an attempt while the database is unavailable.
RECORD_RETRY_INTERVAL = 0.5


def record_through_outage(params: dict, window: float, extra: dict | None = None) -> Recorded:
    """Record the outcome in `params` on a store of its own and say what is left to do after it.

    The provider may already have the message: recording its outcome is what keeps it from being sent
    again. While the database is unavailable the record is tried again on a new connection every
    `RECORD_RETRY_INTERVAL` seconds for up to `window` seconds (a restart, a failover); past that it is kept
    in Redis (`spool`, with `extra`: what the send does after its record) and applied when the database
    returns, and the answer says `deferred`. With Redis unavailable too, the last error is raised: the
    claim's lease runs out and the message is sent again, counted as in doubt."""
    deadline = time.monotonic() + window
    ids = {"message_id": params["message_id"], "campaign_id": params["campaign_id"]}
    while True:
        try:
            with open_store() as store:
                return store.record(params)
        except Exception as exc:  # noqa: BLE001 - only an unavailable database is waited out
            if not is_unavailable(exc):
                raise
            error = exc
        if time.monotonic() >= deadline:
            break
        log.warning("could not record a send attempt; trying again", extra={**ids, "error": describe(error)})
        time.sleep(RECORD_RETRY_INTERVAL)
    try:
        spool.keep_outcome(get_redis(), params, extra)
    except RedisError as redis_error:
        log.error(
            "gave up recording a send attempt: neither the database nor Redis takes it",
            extra={**ids, "error": describe(error), "redis_error": type(redis_error).__name__, "window": window},
        )
        raise error from None
    metrics.count_spooled("outcome")
    log.warning(
        "the database is unavailable: the send's record waits in Redis", extra={**ids, "error": describe(error)}
    )
    return Recorded(True, 0, False, False, deferred=True)
