"""The send job's reads and writes, in as few round trips as the database allows.

A send does three things around the provider call: load the message locked (with its campaign and
customer), record the attempt's `Outcome` and commit, then check whether the campaign has pending
messages left (after the commit, so that the check sees every commit before it). On PostgreSQL the store
runs them in psycopg's pipeline mode, two round trips in all; elsewhere (SQLite) through the session.
Both run the same statements: the load here, the record and the check from `lifecycle`. A store is a
context manager: leaving it ends its transaction and gives its connection back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, Self

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import and_, bindparam, exists, select
from sqlalchemy.engine import Compiled

from app import clock
from app.database import describe, is_unavailable
from app.extensions import db
from app.messaging.lifecycle import HOLD_UNTIL, LAST_PENDING, RECORD_ATTEMPT, pending_exists_now
from app.models import Campaign, Customer, CustomerOptOut, DeliveryReceipt, OutboundMessage

log = logging.getLogger(__name__)

LOAD_FOR_SEND = (
    select(
        OutboundMessage.status,
        OutboundMessage.retry_count,
        OutboundMessage.campaign_id,
        OutboundMessage.customer_id,
        # A customer who opted out of the channel after the message was queued is not messaged: the
        # message is canceled instead (one primary-key probe, in the same round trip).
        exists()
        .where(
            and_(
                CustomerOptOut.customer_id == OutboundMessage.customer_id,
                CustomerOptOut.channel == Campaign.channel,
            )
        )
        .label("opted_out"),
        # A paused (or canceled) campaign's job sends nothing: checked just before the provider call.
        Campaign.status.label("campaign_status"),
        Campaign.channel,
        Campaign.base_template,
        Campaign.whatsapp_template,
        # Whether QUIET_HOURS hold this message (checked beside the pause, before the provider call).
        Campaign.respect_quiet_hours,
        Customer.phone,
        Customer.first_name,
        Customer.last_name,
        Customer.location,
        Customer.preferred_product,
    )
    .join(Campaign, Campaign.id == OutboundMessage.campaign_id)
    .outerjoin(Customer, Customer.id == OutboundMessage.customer_id)
    .where(OutboundMessage.id == bindparam("message_id"))
    # Two workers never send one message at once: the second skips the row the first holds.
    .with_for_update(of=OutboundMessage, skip_locked=True)
)


@dataclass(frozen=True)
class Outcome:
    """What an attempt ends in: the message's new status (`pending` when it is tried again), the retries
    it has used, the body sent (and its SMS segments), and what the provider said: its name and message id
    when it took it, the error, its code and class when it did not. A `held` one made no attempt: the
    message stays as it is."""

    status: str
    retries_used: int
    body: str | None = None
    error: str | None = None
    error_code: str | None = None
    error_class: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    retry_after: float | None = None  # a throttled attempt: seconds the provider asked to wait (not stored)
    held: bool = False  # the campaign is not sending (paused): nothing was attempted, nothing is recorded
    segments: int | None = None  # an SMS body's segments; None for WhatsApp, or when nothing was rendered
    recipient_opted_out: bool = False  # the provider says the recipient opted out with it (not stored)


# A receipt that arrived before the provider id it names was recorded (a fast provider beats the commit).
WAITING_RECEIPT = (
    select(DeliveryReceipt.id)
    .where(
        DeliveryReceipt.provider == bindparam("provider"),
        DeliveryReceipt.provider_message_id == bindparam("provider_message_id"),
    )
    .limit(1)
)


@dataclass(frozen=True)
class Recorded:
    """What the record found after its commit."""

    pending_left: bool  # the campaign still has pending messages
    receipt_waiting: bool  # a receipt for the provider id just recorded is waiting to be applied


def _record_params(message_id: int, campaign_id: int, outcome: Outcome, now: datetime) -> dict:
    """The bind parameters of `RECORD_ATTEMPT`, `LAST_PENDING` and `WAITING_RECEIPT`, named in this one place."""
    return {
        "message_id": message_id,
        "campaign_id": campaign_id,
        "new_status": outcome.status,
        "body": outcome.body,
        "segments": outcome.segments,
        "error": outcome.error,
        "error_code": outcome.error_code,
        "error_class": outcome.error_class,
        "retries_used": outcome.retries_used,
        "provider": outcome.provider,
        "provider_message_id": outcome.provider_message_id,
        "now": now,
    }


CAMPAIGN_STATUS = select(Campaign.status).where(Campaign.id == bindparam("campaign_id"))


class MessageStore(Protocol):
    def campaign_status(self, campaign_id: int) -> str | None:
        """The campaign's status now, read on the store's connection (within its transaction)."""

    def load(self, message_id: int) -> dict | None:
        """The message's fields locked for this send, or None (missing, or another worker holds it)."""

    def record(self, params: dict) -> Recorded:
        """Write the attempt, commit, and say what is left to do after it."""

    def hold(self, message_id: int, not_before: datetime) -> bool:
        """Keep the pending message until `not_before` (quiet hours) and commit; True when it was held."""

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
    """Through the session: for SQLite, where locks and round trips cost nothing."""

    def campaign_status(self, campaign_id: int) -> str | None:
        return db.session.connection().execute(CAMPAIGN_STATUS, {"campaign_id": campaign_id}).scalar()

    def load(self, message_id: int) -> dict | None:
        row = db.session.connection().execute(LOAD_FOR_SEND, {"message_id": message_id}).one_or_none()
        return row._asdict() if row is not None else None

    def record(self, params: dict) -> Recorded:
        db.session.connection().execute(RECORD_ATTEMPT, params)
        db.session.commit()
        waiting = params["provider_message_id"] is not None and db.session.scalar(WAITING_RECEIPT, params) is not None
        db.session.commit()
        return Recorded(pending_exists_now(params["campaign_id"]), waiting)

    def hold(self, message_id: int, not_before: datetime) -> bool:
        params = {"message_id": message_id, "not_before": not_before, "now": clock.now()}
        held = db.session.connection().execute(HOLD_UNTIL, params).rowcount == 1
        db.session.commit()
        return held

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


class PipelineStore(_ClosedOnExit):
    """Raw psycopg in pipeline mode: BEGIN and the locked read in one round trip; the update, its
    commit, the pending check and its commit in another."""

    def __init__(self) -> None:
        self._pooled = db.engine.raw_connection()
        self._conn = self._pooled.driver_connection
        self._cursor = self._conn.cursor(row_factory=dict_row)

    def campaign_status(self, campaign_id: int) -> str | None:
        self._cursor.execute(*_sql("campaign_status", CAMPAIGN_STATUS, {"campaign_id": campaign_id}), prepare=True)
        row = self._cursor.fetchone()
        return None if row is None else row["status"]

    def load(self, message_id: int) -> dict | None:
        with self._conn.pipeline():
            self._cursor.execute(*_sql("load", LOAD_FOR_SEND, {"message_id": message_id}), prepare=True)
        return self._cursor.fetchone()

    def record(self, params: dict) -> Recorded:
        receipts = params["provider_message_id"] is not None
        with self._conn.pipeline():
            self._cursor.execute(*_sql("record", RECORD_ATTEMPT, params), prepare=True)
            self._conn.commit()
            # Runs after the commit above, on the server, in order: it sees every commit before it.
            self._cursor.execute(*_sql("pending", LAST_PENDING, params), prepare=True)
            if receipts:  # in the same round trip: a receipt that came before this commit
                waiting = self._conn.cursor()
                waiting.execute(*_sql("receipt", WAITING_RECEIPT, params), prepare=True)
            self._conn.commit()
        pending_left = self._cursor.fetchone() is not None
        return Recorded(pending_left, receipts and waiting.fetchone() is not None)

    def hold(self, message_id: int, not_before: datetime) -> bool:
        params = {"message_id": message_id, "not_before": not_before, "now": clock.now()}
        with self._conn.pipeline():  # the update and its commit in one round trip
            self._cursor.execute(*_sql("hold", HOLD_UNTIL, params), prepare=True)
            self._conn.commit()
        return self._cursor.rowcount == 1

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
    return PipelineStore() if db.engine.dialect.driver == "psycopg" else SessionStore()


# Seconds between two tries at recording an attempt while the database is unavailable.
RECORD_RETRY_INTERVAL = 0.5


def record_through_outage(
    store: MessageStore, message_id: int, campaign_id: int, outcome: Outcome, window: float
) -> Recorded:
    """Record `outcome` through `store` and say what is left to do after it; while
    the database is unavailable, record again on a new connection every `RECORD_RETRY_INTERVAL` seconds
    for up to `window` seconds, then raise the last error.

    The provider may already have the message: recording its outcome is what keeps the reconciler from
    sending it again, so a short outage (a restart, a failover) must not lose it. The row lock goes with
    the failed connection; the record stays right without it, as it only applies to a message still pending.
    """
    params = _record_params(message_id, campaign_id, outcome, clock.now())
    try:
        return store.record(params)
    except Exception as exc:  # noqa: BLE001 - only an unavailable database is waited out
        if not is_unavailable(exc):
            raise
        error = exc
    store.close()
    extra = {"message_id": message_id, "campaign_id": campaign_id}
    log.warning("could not record a send attempt; trying again", extra={**extra, "error": describe(error)})
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        time.sleep(RECORD_RETRY_INTERVAL)
        try:
            with open_store() as fresh:
                return fresh.record(params)
        except Exception as exc:  # noqa: BLE001
            if not is_unavailable(exc):
                raise
            error = exc
    log.error(
        "gave up recording a send attempt; the message stays pending and will be sent again",
        extra={**extra, "error": describe(error), "window": window},
    )
    raise error
