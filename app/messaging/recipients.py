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
from sqlalchemy import ColumnElement, false, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.audiences.caps import capped
from app.customers.optouts import not_opted_out
from app.database import statement_budget
from app.extensions import db
from app.messaging.variants import assignment
from app.models import Customer, MessageStatus, OutboundMessage
from config import FrequencyCap


@dataclass(frozen=True)
class NewRows:
    """What one bulk insert created: how many rows, and the id range they lie in (None when none); for a
    send with a frequency cap, how many customers it left out for it (`capped`)."""

    count: int
    first_id: int | None
    last_id: int | None
    capped: int = 0


def create_pending_messages(
    campaign_id: int,
    audience: ColumnElement[bool],
    channel: str,
    cap: FrequencyCap | None = None,
    variants: list[dict] | None = None,
) -> NewRows:
    """Insert a pending message for every customer matching `audience` who has none in the campaign, is
    not opted out of `channel` and, with a frequency `cap`, is not capped; `capped` counts the customers the
    cap left out (those without a message in the campaign before). With `variants`, each message records the
    customer's (`app.messaging.variants`).

    One statement, in the caller's transaction; the caller commits. On PostgreSQL it runs with
    `SEND_STATEMENT_TIMEOUT` for the rest of the transaction: a million recipients take about 9 s.
    """
    now = clock.now()
    is_capped = capped(cap, now) if cap is not None else false()
    candidates = (
        select(Customer.id.label("customer_id"), is_capped.label("capped"))
        .where(audience, not_opted_out(channel))
        # A key-share lock on each customer read, held until the commit: a concurrent delete of one of them
        # waits for this send and then sees its message (app.customers.service.delete_customer).
        .with_for_update(read=True, key_share=True)
    )
    dialect = db.session.get_bind().dialect.name
    if dialect == "postgresql":
        # One statement. With a cap the candidates are read once (a CTE), for the insert and for the count
        # of the capped; without one they feed the insert alone, and nothing is counted twice.
        if cap is None:
            source, left_out = candidates.subquery(), literal(0)
        else:
            source = candidates.cte("candidates")
            left_out = (
                select(func.count())
                .where(source.c.capped, ~_has_message(source.c.customer_id, campaign_id))
                .scalar_subquery()
            )
        inserted = _insert(campaign_id, source, now, dialect, variants).cte("inserted")
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            count, first, last, held = db.session.execute(
                select(func.count(), func.min(inserted.c.id), func.max(inserted.c.id), left_out)
            ).one()
        return NewRows(count, first, last, held)
    # SQLite: one writer at a time, so the count read before the insert is what the insert leaves out.
    held = 0
    if cap is not None:
        found = candidates.subquery()
        held = db.session.scalar(
            select(func.count()).where(found.c.capped, ~_has_message(found.c.customer_id, campaign_id))
        )
    count, first, last = 0, None, None
    for (message_id,) in db.session.execute(_insert(campaign_id, candidates.subquery(), now, dialect, variants)):
        count += 1
        first = message_id if first is None else min(first, message_id)
        last = message_id if last is None else max(last, message_id)
    return NewRows(count, first, last, held)


def _has_message(customer_id, campaign_id: int) -> ColumnElement[bool]:
    return (
        select(OutboundMessage.id)
        .where(OutboundMessage.customer_id == customer_id, OutboundMessage.campaign_id == campaign_id)
        .exists()
    )


def _insert(campaign_id: int, candidates, now, dialect: str, variants: list[dict] | None = None):
    """`INSERT ... SELECT` of a pending message for each candidate the cap leaves in; repeats do nothing."""
    rows = select(
        literal(campaign_id),
        candidates.c.customer_id,
        literal(MessageStatus.PENDING),
        literal(0),
        literal(now, OutboundMessage.created_at.type),
        literal(now, OutboundMessage.updated_at.type),
        assignment(variants, campaign_id, candidates.c.customer_id),
    ).where(~candidates.c.capped)
    columns = ["campaign_id", "customer_id", "status", "retry_count", "created_at", "updated_at", "variant"]
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(OutboundMessage)
        .from_select(columns, rows)
        # `uq_outbound_messages_customer_campaign_fallback`: a customer messaged in the campaign already.
        .on_conflict_do_nothing()
        .returning(OutboundMessage.id)
    )


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
