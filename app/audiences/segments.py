"""Saved segments (a named filter), the audience count, and a scheduled campaign's segment evaluated when it
fires. One transaction per call."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import ColumnElement, func, select, update

from app.audiences import caps, filters
from app.customers.optouts import opted_out
from app.errors import ConflictError, NotFoundError, ValidationFailed
from app.extensions import db
from app.messaging import recipients
from app.models import Campaign, CampaignStatus, Channel, Customer, Segment
from app.pagination import paginate

# The statuses of a campaign that may still fire or start, and so evaluate the segment it names; a canceled
# one never will (deleting the segment clears its `segment_id`).
WAITING = (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED, CampaignStatus.PAUSED)


def get_segment(segment_id: int, lock: bool = False) -> Segment:
    """The segment (404 when there is none); `lock` holds its row until the commit."""
    segment = db.session.get(Segment, segment_id, with_for_update=True if lock else None)
    if segment is None:
        raise NotFoundError(f"segment {segment_id} not found")
    return segment


def create_segment(data: Mapping) -> Segment:
    filters.compile_filter(data["filter"], "filter")  # a bad filter is a 422 now, not at a send
    segment = Segment(name=data["name"], filter=data["filter"])
    db.session.add(segment)
    db.session.commit()
    return segment


def update_segment(segment_id: int, data: Mapping) -> Segment:
    """Rename it or change its filter; a scheduled campaign naming it counts the new filter when it fires."""
    segment = get_segment(segment_id)
    if "filter" in data:
        filters.compile_filter(data["filter"], "filter")
    for key, value in data.items():
        setattr(segment, key, value)
    db.session.commit()
    return segment


def delete_segment(segment_id: int) -> None:
    """Delete a segment no scheduled campaign waits on (409 naming them); the row lock makes a concurrent
    send that names it wait, then find it gone."""
    segment = get_segment(segment_id, lock=True)
    waiting = db.session.scalars(
        select(Campaign.id)
        .where(Campaign.segment_id == segment_id, Campaign.status.in_(WAITING))
        .order_by(Campaign.id)
        .limit(20)
    ).all()
    if waiting:
        db.session.rollback()
        names = ", ".join(map(str, waiting))
        raise ConflictError(
            f"segment {segment_id} is the audience of scheduled campaign(s) {names}; it is evaluated when they fire",
            campaign_ids=list(waiting),
        )
    db.session.delete(segment)
    db.session.commit()


def list_segments(page_size: int, page: int | None = None, cursor: str | None = None) -> dict:
    return paginate(select(Segment), Segment.id, "segments", page_size, page, cursor)


def segment_filter(segment_id: int, path: str = "segment_id", lock: bool = False) -> dict:
    """The segment's filter as it is now; a 422 naming `path` when there is no such segment. `lock` holds
    the segment (a key-share lock) until the commit, so that it cannot be deleted meanwhile."""
    stmt = select(Segment.filter).where(Segment.id == segment_id)
    if lock:
        stmt = stmt.with_for_update(read=True, key_share=True)
    spec = db.session.scalar(stmt)
    if spec is None:
        raise ValidationFailed(f"{path}: no segment with id {segment_id}", {path: [f"no segment with id {segment_id}"]})
    return spec


def segment_condition(segment_id: int, path: str = "segment_id", lock: bool = False) -> ColumnElement[bool]:
    """The condition of the segment's filter (`segment_filter`)."""
    return filters.compile_filter(segment_filter(segment_id, path, lock), path)


def audience_condition(data: Mapping, path: str = "") -> ColumnElement[bool]:
    """`{"filter": ...}` or `{"segment_id": ...}` as a condition on customers."""
    prefix = f"{path}." if path else ""
    if "segment_id" in data:
        return segment_condition(data["segment_id"], f"{prefix}segment_id")
    return filters.compile_filter(data["filter"], f"{prefix}filter")


def count(data: Mapping) -> dict:
    """How many customers the filter or segment matches now; of those, how many are opted out of each
    channel, and how many the frequency cap would leave out of a send now (0 without a cap). Read only."""
    try:
        matched = audience_condition(data)
        cap = caps.cap_for()
        columns = [func.count()]
        columns += [func.count().filter(opted_out(channel)) for channel in Channel.ALL]
        if cap is not None:
            columns.append(func.count().filter(caps.capped(cap)))
        row = db.session.execute(select(*columns).select_from(Customer).where(matched)).one()
    finally:
        db.session.rollback()
    return {
        "customers": row[0],
        "opted_out": dict(zip(Channel.ALL, row[1 : 1 + len(Channel.ALL)], strict=True)),
        "frequency_capped": row[-1] if cap is not None else 0,
    }


def keep_for_schedule(campaign: Campaign, segment_id: int) -> None:
    """Name the segment as the audience the scheduled campaign evaluates when it fires, in the caller's
    transaction (which holds the campaign's row lock). A campaign waits on one segment at a time."""
    segment_condition(segment_id, "audience.segment_id", lock=True)  # it exists, and stays until the commit
    if campaign.segment_id not in (None, segment_id):
        raise ConflictError(
            f"campaign {campaign.id} already evaluates segment {campaign.segment_id} when it fires; "
            "send to that one, or unschedule the campaign first",
            campaign_status=campaign.status,
        )
    db.session.execute(update(Campaign).where(Campaign.id == campaign.id).values(segment_id=segment_id))


def add_waiting_segment(campaign_id: int) -> int:
    """When a campaign starts: the pending messages of the segment it waited on, created from the segment's
    filter as it is now (one INSERT ... SELECT, opt-outs and the cap applied), and the segment let go. In
    the caller's transaction; returns how many messages it created (0 when there was no segment)."""
    campaign = db.session.scalar(
        select(Campaign).where(Campaign.id == campaign_id).execution_options(populate_existing=True)
    )
    if campaign is None or campaign.segment_id is None:
        return 0
    spec = db.session.scalar(select(Segment.filter).where(Segment.id == campaign.segment_id))
    created = 0
    if spec is not None:
        condition = filters.compile_filter(spec, "segment.filter")
        created = recipients.create_pending_messages(
            campaign.id, condition, campaign.channel, caps.cap_for(campaign), campaign.variants
        ).count
    db.session.execute(update(Campaign).where(Campaign.id == campaign_id).values(segment_id=None))
    return created
