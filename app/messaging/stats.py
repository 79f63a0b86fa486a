"""A campaign's progress, counted from its messages."""

from __future__ import annotations

from sqlalchemy import func, select

from app.extensions import db
from app.models import MessageStatus, OutboundMessage


def campaign_stats(campaign_id: int) -> dict[str, int]:
    """`{"total", "pending", "sent", "failed"}` counted from the campaign's messages."""
    rows = db.session.execute(
        select(OutboundMessage.status, func.count())
        .where(OutboundMessage.campaign_id == campaign_id)
        .group_by(OutboundMessage.status)
    ).all()
    stats = {status: 0 for status in MessageStatus.ALL}
    stats.update({status: count for status, count in rows})
    stats["total"] = sum(stats.values())
    return stats
