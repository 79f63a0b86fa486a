"""A campaign's progress, counted from its messages."""

from __future__ import annotations

from sqlalchemy import Select, func, select

from app import clock
from app.extensions import db
from app.models import MessageStatus, OutboundMessage


def stats_query(campaign_id: int) -> Select:
    """One pass over the campaign's messages, grouped by status: how many, how many read, and their SMS
    segments. The sums ride on the rows the counts read anyway (`read_at` already takes each row), so
    `segments_sent` costs no second scan (bench/plans.py times this very statement)."""
    return (
        select(
            OutboundMessage.status,
            func.count(),
            func.count(OutboundMessage.read_at),
            func.coalesce(func.sum(OutboundMessage.segments), 0),
        )
        .where(OutboundMessage.campaign_id == campaign_id)
        .group_by(OutboundMessage.status)
    )


def campaign_stats(campaign_id: int) -> dict[str, int]:
    """How many of the campaign's messages are in each status (each counted once, under its current one),
    `read` (delivered ones with `read_at`), `total`, and `segments_sent`: the SMS segments of the messages
    a provider accepted (sent, delivered or undelivered), what the campaign is billed for; and
    `waiting_quiet_hours`: pending messages held by quiet hours until a time still ahead."""
    rows = db.session.execute(stats_query(campaign_id)).all()
    stats = {status: 0 for status in MessageStatus.ALL}
    stats.update({status: count for status, count, _, _ in rows})
    stats["read"] = sum(read for _, _, read, _ in rows)
    stats["total"] = sum(count for _, count, _, _ in rows)
    stats["segments_sent"] = sum(int(segs) for status, _, _, segs in rows if status in MessageStatus.ACCEPTED)
    # Among the pending; only asked when some are pending (a finished campaign's stats stay one query).
    stats["waiting_quiet_hours"] = db.session.scalar(waiting_quiet_hours_query(campaign_id)) if stats["pending"] else 0
    return stats


def waiting_quiet_hours_query(campaign_id: int) -> Select:
    """The campaign's pending messages held by quiet hours until a time still ahead. Read from the partial
    index `ix_outbound_messages_waiting` (only pending messages with a `not_before` are in it), so it
    costs as much as there are waiting messages, not the campaign's size."""
    return select(func.count()).where(
        OutboundMessage.campaign_id == campaign_id,
        OutboundMessage.status == MessageStatus.PENDING,
        OutboundMessage.not_before.is_not(None),
        OutboundMessage.not_before > clock.now(),
    )
