"""Recipients of a send: one pending outbound message per customer, created set-based.

Rows are created by one `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so a customer has at most one
message per campaign however often `/send` is called, and the web process never holds a list of
recipients. Customers opted out of the campaign's channel are left out by the same statement (an
anti-join against their opt-outs, `app.customers.optouts.not_opted_out`), and so are customers the
frequency cap holds back (`app.audiences.caps`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from sqlalchemy import ColumnElement, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.audiences.caps import not_capped
from app.customers.optouts import not_opted_out
from app.database import statement_budget
from app.extensions import db
from app.models import Customer, MessageStatus, OutboundMessage
from config import FrequencyCap


@dataclass(frozen=True)
class NewRows:
    """What one bulk insert created: how many rows, and the id range they lie in (None when none)."""

    count: int
    first_id: int | None
    last_id: int | None


def create_pending_messages(
    campaign_id: int, audience: ColumnElement[bool], channel: str, cap: FrequencyCap | None = None
) -> NewRows:
    """Insert a pending message for every customer matching `audience` who has none in the campaign, is
    not opted out of `channel` and, with a frequency `cap`, is not capped.

    One statement, in the caller's transaction; the caller commits. On PostgreSQL it runs with
    `SEND_STATEMENT_TIMEOUT` for the rest of the transaction: a million recipients take about 9 s.
    """
    now = clock.now()
    source = select(
        literal(campaign_id),
        Customer.id,
        literal(MessageStatus.PENDING),
        literal(0),
        literal(now, OutboundMessage.created_at.type),
        literal(now, OutboundMessage.updated_at.type),
    ).where(audience, not_opted_out(channel))
    if cap is not None:
        source = source.where(not_capped(cap, now))
    # A key-share lock on each customer read, held until the commit: a concurrent delete of one of them
    # waits for this send and then sees its message (app.customers.service.delete_customer).
    source = source.with_for_update(read=True, key_share=True)
    columns = ["campaign_id", "customer_id", "status", "retry_count", "created_at", "updated_at"]
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(OutboundMessage)
        .from_select(columns, source)
        .on_conflict_do_nothing(index_elements=["customer_id", "campaign_id"])
        .returning(OutboundMessage.id)
    )
    if dialect == "postgresql":
        # Count in the database: a 100k-row insert sends back three numbers, not 100k ids.
        inserted = stmt.cte("inserted")
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            count, first, last = db.session.execute(
                select(func.count(), func.min(inserted.c.id), func.max(inserted.c.id))
            ).one()
        return NewRows(count, first, last)
    count, first, last = 0, None, None
    for (message_id,) in db.session.execute(stmt):
        count += 1
        first = message_id if first is None else min(first, message_id)
        last = message_id if last is None else max(last, message_id)
    return NewRows(count, first, last)


# The fields a message renders from, in the order `stream_recipient_fields` yields them.
RENDER_FIELDS = ("first_name", "last_name", "preferred_product", "location", "attributes")


def opt_out_filter(channel: str) -> ColumnElement[bool] | None:
    """The customers who may receive `channel` (not opted out of it; `create_pending_messages` applies the
    same): the estimate counts the customers it excludes as `skipped_opted_out`, and streams only those it
    keeps. None would apply no opt-out."""
    return not_opted_out(channel)


def not_yet_messaged(campaign_id: int) -> ColumnElement[bool]:
    """Customers without a message in the campaign: a send adds only these (`ON CONFLICT DO NOTHING`)."""
    existing = select(OutboundMessage.id).where(
        OutboundMessage.customer_id == Customer.id, OutboundMessage.campaign_id == campaign_id
    )
    return ~existing.exists()


def count_customers(where: ColumnElement[bool]) -> int:
    return db.session.scalar(select(func.count()).select_from(Customer).where(where))


def stream_recipient_fields(where: ColumnElement[bool], chunk: int = 5000):
    """The render fields of each customer matching `where`, as tuples in `RENDER_FIELDS` order, fetched
    `chunk` rows at a time (a server-side cursor on PostgreSQL): 100k recipients never sit in memory at
    once. No lock is taken: nothing is written from them."""
    stmt = select(*(getattr(Customer, name) for name in RENDER_FIELDS)).where(where)
    # Core, on the session's connection (its transaction): rows come back as plain tuples, without the ORM.
    result = db.session.connection().execute(stmt.execution_options(yield_per=chunk))
    try:
        yield from result
    finally:
        result.close()
