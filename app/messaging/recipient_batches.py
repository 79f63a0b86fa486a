"""A send's recipients, added in batches of customers in id order: the first batch in the send request,
the rest after its answer, by a job of the control queue.

A million-customer `INSERT ... SELECT` takes seconds; a send request should not. So `/send` to an audience
adds the messages of the first `RECIPIENT_BATCH` customers it matches (more while none of them can be sent
to, so that "nothing to send" is still answered at once), commits them with the campaign's move to
`sending`, answers, and leaves the rest to `add_rest`. Each later batch is its own short transaction, on
the campaign's locked row: the next `RECIPIENT_BATCH` customers after `adding_after` who match the
audience get their pending message (opt-outs and the frequency cap applied, as in one big insert), the
campaign's window is refilled, and `adding_after` moves on. Sends start with the first batch and go on
while later ones are added.

PostgreSQL holds where the adding is (`Campaign.adding_*`), so nothing is lost with Redis: the reconciler
enqueues `add_rest` again for a campaign whose last batch committed over `ADDING_STALE` ago (a flushed
Redis, a killed worker, a request whose enqueue failed). Two runs at once are harmless: each batch reads
`adding_after` under the campaign's row lock, and a customer has at most one message per campaign
(`ON CONFLICT DO NOTHING`). A campaign does not end while it is adding (`lifecycle.finish_campaign`); a
canceled one stops adding at its next batch, and a paused one keeps adding pending messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, and_, select, true

from app import clock
from app.audiences import caps, filters, segments
from app.customers import optouts
from app.extensions import db
from app.messaging import lifecycle, recipients
from app.messaging.send import window
from app.models import Campaign, CampaignStatus, Customer
from app.queues import get_control_queue

log = logging.getLogger(__name__)

ADD_JOB = "app.messaging.jobs.add_recipients"
# A campaign still adding whose last batch is older than this has lost its job: the reconciler enqueues
# it again. A batch takes well under a second.
ADDING_STALE = timedelta(seconds=30)
# Statuses in which a campaign goes on adding: all but canceled (and sent or failed, which it cannot reach
# while it adds). A scheduled campaign taken back to draft keeps every recipient its send stored, as a
# send that stored them all at once would have.
ADDING = (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED, CampaignStatus.SENDING, CampaignStatus.PAUSED)


def audience_spec(audience: Mapping, lock: bool = True) -> dict:
    """What a send's `audience` is, kept on the campaign while it adds: a segment as its filter now (the
    segment held until the commit), so that editing the segment later does not change this send."""
    if "segment_id" in audience:
        spec = segments.segment_filter(audience["segment_id"], "audience.segment_id", lock=lock)
        return {"filter": spec, "segment_id": audience["segment_id"]}
    return dict(audience)


def audience_condition(spec: Mapping) -> ColumnElement[bool]:
    """The customers `spec` (from `audience_spec`) matches, as a condition."""
    if "filter" in spec:
        path = "audience.segment_id" if "segment_id" in spec else "audience.filter"
        return filters.compile_filter(spec["filter"], path)
    if "location" in spec:
        return Customer.location == spec["location"]
    return true()


@dataclass
class Batch:
    """What one batch did: messages created, customers left out as opted out or by the frequency cap, and
    the last customer id it covered (None: the audience is done)."""

    created: int = 0
    skipped_opted_out: int = 0
    skipped_frequency_cap: int = 0
    after: int | None = None


def add_batch(campaign: Campaign, audience: ColumnElement[bool], after: int, size: int) -> Batch:
    """The pending messages of the next `size` customers after id `after` who match `audience`, in the
    caller's transaction. The batch ends before the next matching customer's id (`after` of the result), or
    is the last one when there is none."""
    beyond = db.session.scalar(
        select(Customer.id).where(audience, Customer.id > after).order_by(Customer.id).offset(size).limit(1)
    )
    in_batch = and_(audience, Customer.id > after, *([Customer.id < beyond] if beyond is not None else []))
    rows = recipients.create_pending_messages(
        campaign.id, in_batch, campaign.channel, caps.cap_for(campaign), campaign.variants
    )
    return Batch(
        created=rows.count,
        skipped_opted_out=optouts.count_opted_out(in_batch, campaign.channel),
        skipped_frequency_cap=rows.capped,
        after=beyond - 1 if beyond is not None else None,
    )


@dataclass
class Added:
    """What a send has added so far: the totals of its batches, and whether more are left for `add_rest`.
    Kept on the campaign as `last_send`."""

    created: int = 0
    skipped_opted_out: int = 0
    skipped_frequency_cap: int = 0
    more: bool = False

    @classmethod
    def so_far(cls, last_send: Mapping | None) -> Added:
        """The totals a campaign's `last_send` holds."""
        last_send = last_send or {}
        return cls(
            last_send.get("added", 0),
            last_send.get("skipped_opted_out", 0),
            last_send.get("skipped_frequency_cap", 0),
            bool(last_send.get("adding")),
        )

    def count(self, batch: Batch) -> None:
        self.created += batch.created
        self.skipped_opted_out += batch.skipped_opted_out
        self.skipped_frequency_cap += batch.skipped_frequency_cap
        self.more = batch.after is not None

    def as_last_send(self, at: datetime) -> dict:
        return {
            "added": self.created,
            "skipped_opted_out": self.skipped_opted_out,
            "skipped_frequency_cap": self.skipped_frequency_cap,
            "adding": self.more,
            "updated_at": at.isoformat(),
        }


def add_first(campaign: Campaign, spec: Mapping, has_pending: bool) -> Added:
    """The send request's part, in its transaction, on the campaign's locked row: batches until one created
    a message (or the campaign `has_pending` already), or the audience ends. The campaign records where the
    rest starts; the caller commits, then calls `enqueue(campaign.id)` when `more`."""
    audience = audience_condition(spec)
    size = current_app.config["RECIPIENT_BATCH"]
    added, after = Added(), 0
    while True:
        batch = add_batch(campaign, audience, after, size)
        added.count(batch)
        if batch.after is None or added.created or has_pending:
            break
        after = batch.after
    _record(campaign, added, spec, batch.after)
    return added


def add_rest(campaign_id: int) -> int:
    """Add the rest of the campaign's audience, batch by batch, each in its own transaction; refill the
    window after each. Returns how many messages it created. Safe to run twice, and beside itself."""
    size = current_app.config["RECIPIENT_BATCH"]
    created = 0
    while True:
        campaign = db.session.scalar(
            select(Campaign)
            .where(Campaign.id == campaign_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if campaign is None or campaign.adding_after is None:
            db.session.commit()
            return created
        added = Added.so_far(campaign.last_send)
        if campaign.status not in ADDING:  # canceled: what is not added yet never will be
            added.more = False
            _record(campaign, added)
            db.session.commit()
            log.info("stopped adding recipients", extra={"campaign_id": campaign_id, "status": campaign.status})
            return created
        batch = add_batch(campaign, audience_condition(campaign.adding_audience), campaign.adding_after, size)
        added.count(batch)
        _record(campaign, added, campaign.adding_audience, batch.after)
        sending = campaign.status == CampaignStatus.SENDING
        db.session.commit()
        created += batch.created
        if sending:
            window.refill(campaign_id)
        if not added.more:
            log.info("added recipients", extra={"campaign_id": campaign_id, "added": added.created})
            if sending:
                lifecycle.finish_campaign(campaign_id)  # nothing to send among the last batches
            return created


def _record(campaign: Campaign, added: Added, spec: Mapping | None = None, after: int | None = None) -> None:
    """Where the campaign's adding stands, on its row: the audience and the last customer id covered while
    `added.more`, none of it once done; and `last_send`, the totals so far."""
    now = clock.now()
    campaign.adding_audience = dict(spec) if added.more else None
    campaign.adding_after = after if added.more else None
    campaign.adding_at = now if added.more else None
    campaign.last_send = added.as_last_send(now)


def add_job_id(campaign_id: int, after: int) -> str:
    """One job per campaign and position: a reconciler that enqueues it twice for the same stalled batch
    replaces the job instead of adding a second."""
    return f"add_recipients-{campaign_id}-{after}"


def enqueue(campaign_id: int, after: int) -> bool:
    """Leave the rest of the audience to a job of the control queue; if Redis fails, the reconciler enqueues
    it once the adding looks stalled. True when it was enqueued."""
    try:
        get_control_queue().enqueue(
            ADD_JOB,
            args=(campaign_id,),
            job_id=add_job_id(campaign_id, after),
            job_timeout=3600,
            result_ttl=0,
            description=f"add the rest of the recipients of campaign {campaign_id}",
        )
    except RedisError:
        log.warning(
            "could not enqueue the rest of a send's recipients", extra={"campaign_id": campaign_id}, exc_info=True
        )
        return False
    return True


def resume_stalled(now: datetime | None = None) -> list[int]:
    """The reconciler's step: enqueue `add_rest` again for each campaign adding whose last batch committed
    over `ADDING_STALE` ago. Returns their ids."""
    before = (now or clock.now()) - ADDING_STALE
    stalled = db.session.execute(
        select(Campaign.id, Campaign.adding_after).where(
            Campaign.adding_after.is_not(None), Campaign.adding_at < before
        )
    ).all()
    db.session.commit()
    resumed = []
    for campaign_id, after in stalled:
        log.warning("resuming a send's recipients", extra={"campaign_id": campaign_id, "after_customer_id": after})
        if enqueue(campaign_id, after):
            resumed.append(campaign_id)
    return resumed
