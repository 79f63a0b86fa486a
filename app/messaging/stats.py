"""A campaign's progress, counted from its messages."""

from __future__ import annotations

from sqlalchemy import func, select

from app.extensions import db
from app.models import MessageStatus, OutboundMessage


def campaign_stats(campaign_id: int) -> dict[str, int]:
    """How many of the campaign's messages are in each status (each counted once, under its current one),
    `read` (delivered ones with `read_at`) and `total`."""
    rows = db.session.execute(
        select(OutboundMessage.status, func.count(), func.count(OutboundMessage.read_at))
        .where(OutboundMessage.campaign_id == campaign_id)
        .group_by(OutboundMessage.status)
    ).all()
    stats = {status: 0 for status in MessageStatus.ALL}
    stats.update({status: count for status, count, _ in rows})
    stats["read"] = sum(read for _, _, read in rows)
    stats["total"] = sum(count for _, count, _ in rows)
    return stats
