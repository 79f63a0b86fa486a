"""The reconciler: PostgreSQL is the truth, and this makes Redis agree with it again.

It runs every `RECONCILE_INTERVAL` seconds and
1. dispatches due `scheduled` campaigns that nothing dispatched (scheduler down, Redis flushed);
2. re-enqueues pending messages of `sending` campaigns untouched for `STALE_AFTER` seconds whose job
   is not waiting in Redis (a crash between commit and enqueue, a flushed Redis, a killed worker);
3. finalizes `sending` campaigns with nothing pending;
4. deletes idempotency keys older than `IDEMPOTENCY_TTL`.
It works in batches and is safe beside workers and beside itself: a message a worker is sending holds
its row lock and is skipped here, and a job that runs twice does not send twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from sqlalchemy import select, update

from app import clock
from app.extensions import db, get_queue, get_redis
from app.idempotency import purge_expired
from app.messaging import dispatch
from app.models import Campaign, CampaignStatus, MessageStatus, OutboundMessage

log = logging.getLogger(__name__)

# A job in one of these states will run without help.
_WAITING = {JobStatus.QUEUED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value}


@dataclass
class ReconcileReport:
    dispatched: list[int] = field(default_factory=list)
    requeued: int = 0
    finalized: dict[int, str] = field(default_factory=dict)
    expired_idempotency_keys: int = 0


def dispatch_due_campaigns() -> list[int]:
    now = clock.now()
    due = db.session.scalars(
        select(Campaign.id).where(Campaign.status == CampaignStatus.SCHEDULED, Campaign.scheduled_at <= now)
    ).all()
    db.session.commit()
    return [campaign_id for campaign_id in due if dispatch.dispatch_campaign(campaign_id, now) is not None]


def _jobs_waiting(message_ids: list[int]) -> list[bool]:
    """Whether each message's job will run without help. A job a worker took off the queue but died
    before starting still says `queued`; it sits in RQ's intermediate queue, so it does not count."""
    queue = get_queue()
    in_limbo = set(IntermediateQueue(queue.key, queue.connection).get_job_ids())
    job_ids = [dispatch.message_job_id(m) for m in message_ids]
    with get_redis().pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
    return [
        bool(status) and status.decode() in _WAITING and job_id not in in_limbo
        for job_id, status in zip(job_ids, statuses, strict=True)
    ]


def requeue_stale_messages(campaign_id: int) -> int:
    """Re-enqueue the campaign's stale pending messages that have no job waiting; returns how many."""
    config = current_app.config
    cutoff = clock.now() - timedelta(seconds=config["STALE_AFTER"])
    batch_size = config["RECONCILE_BATCH_SIZE"]
    after, requeued = 0, 0
    while True:
        rows = db.session.execute(
            select(OutboundMessage.id, OutboundMessage.retry_count)
            .where(
                OutboundMessage.campaign_id == campaign_id,
                OutboundMessage.status == MessageStatus.PENDING,
                OutboundMessage.id > after,
                OutboundMessage.updated_at < cutoff,
            )
            .order_by(OutboundMessage.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)  # a locked row is being sent right now
        ).all()
        if not rows:
            db.session.commit()
            return requeued
        after = rows[-1].id
        lost = [r for r, waiting in zip(rows, _jobs_waiting([r.id for r in rows]), strict=True) if not waiting]
        if lost:
            # Touching them keeps the next run from re-enqueueing them again before they are stale.
            db.session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_([r.id for r in lost]))
                .values(updated_at=clock.now())
                .execution_options(synchronize_session=False)
            )
        db.session.commit()
        requeued += dispatch.enqueue_messages((r.id, r.retry_count) for r in lost)


def reconcile() -> ReconcileReport:
    """One pass of the four steps above."""
    report = ReconcileReport(dispatched=dispatch_due_campaigns())
    sending = db.session.scalars(select(Campaign.id).where(Campaign.status == CampaignStatus.SENDING)).all()
    db.session.commit()
    for campaign_id in sending:
        report.requeued += requeue_stale_messages(campaign_id)
        # finalize_campaign checks for pending messages itself, and does nothing when there are some.
        status = dispatch.finalize_campaign(campaign_id)
        if status:
            report.finalized[campaign_id] = status
    report.expired_idempotency_keys = purge_expired()
    if report.dispatched or report.requeued or report.finalized or report.expired_idempotency_keys:
        log.info(
            "reconciled",
            extra={
                "dispatched": report.dispatched,
                "requeued": report.requeued,
                "finalized": report.finalized,
                "expired_idempotency_keys": report.expired_idempotency_keys,
            },
        )
    return report
