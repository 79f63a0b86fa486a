"""The reconciler: PostgreSQL is the truth, and this makes Redis agree with it again.

It runs every `RECONCILE_INTERVAL` seconds and
1. dispatches due `scheduled` campaigns that nothing dispatched (scheduler down, Redis flushed);
2. re-enqueues pending messages of `sending` campaigns untouched for `STALE_AFTER` seconds whose job
   is not waiting in Redis (a crash between commit and enqueue, a flushed Redis, a killed worker); a
   message waiting out quiet hours counts as untouched only from its `not_before`;
3. finishes `sending` campaigns with nothing pending;
4. applies delivery receipts kept because their message's provider id was not recorded yet;
5. re-enqueues customer imports left `queued` or `running`, untouched for `STALE_AFTER` seconds, whose
   job is not waiting in Redis (a flushed Redis, a killed worker); the job resumes where the import was.
It works in batches and is safe beside workers and beside itself: a message a worker is sending holds
its row lock and is skipped here, and a job that runs twice does not send twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from rq import Queue
from rq.job import Job, JobStatus
from sqlalchemy import or_, select, update

from app import clock
from app.customers import import_jobs
from app.extensions import db
from app.messaging import lifecycle, receipts
from app.messaging.send.enqueue import enqueue_messages, message_job_id
from app.messaging.triggers import dispatch_due_campaign
from app.models import Campaign, CampaignStatus, CustomerImport, ImportStatus, MessageStatus, OutboundMessage
from app.queues import get_control_queue, get_queue, get_redis

log = logging.getLogger(__name__)

# A job in one of these states will run without help.
_WAITING = {JobStatus.QUEUED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value}


@dataclass
class ReconcileReport:
    dispatched: list[int] = field(default_factory=list)
    requeued: int = 0
    finalized: dict[int, str] = field(default_factory=dict)
    requeued_imports: int = 0
    applied_receipts: int = 0


def dispatch_due_campaigns() -> list[int]:
    now = clock.now()
    due = db.session.scalars(
        select(Campaign.id).where(Campaign.status == CampaignStatus.SCHEDULED, Campaign.scheduled_at <= now)
    ).all()
    db.session.commit()
    return [campaign_id for campaign_id in due if dispatch_due_campaign(campaign_id, now) is not None]


def _jobs_waiting(job_ids: list[str], queue: Queue) -> list[bool]:
    """Whether each job (of `queue`) will run without help.

    A job's status alone does not say: a worker that pops a job and dies before starting it (BLPOP for
    a worker on several queues, LMOVE into RQ's intermediate list for one on a single queue) leaves the
    job saying `queued` in no queue at all. The queue is FIFO and jobs only join at its tail, so a
    `queued` job enqueued before the job now at the head has left the list. The statuses are read
    before the head: a job still in the list at that later read is at or behind the head.
    """
    with get_redis().pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "enqueued_at")
        jobs = pipe.execute()
    left_before = _left_queue_before(queue)
    return [_will_run(status, enqueued_at, left_before) for status, enqueued_at in jobs]


def _will_run(status: bytes | None, enqueued_at: bytes | None, left_before: str | None) -> bool:
    state = status.decode() if status else None
    if state == JobStatus.QUEUED.value and left_before is not None:
        # RQ's timestamps are fixed-width UTC, so they compare as strings; a tie counts as waiting.
        return enqueued_at is not None and enqueued_at.decode() >= left_before
    return state in _WAITING


# Later than any enqueue time: an empty queue holds no job.
_END_OF_TIME = "9999-12-31T23:59:59.999999Z"


def _left_queue_before(queue: Queue) -> str | None:
    """A time such that every job enqueued before it has left the queue: when the head job was
    enqueued (a few ids are read, as a head whose job hash is gone says nothing, and RQ skips it), or
    the end of time when the queue is empty. None when it cannot be told this pass."""
    head_ids = queue.connection.lrange(queue.key, 0, 9)
    if not head_ids:
        return _END_OF_TIME
    with queue.connection.pipeline(transaction=False) as pipe:
        for job_id in head_ids:
            pipe.hget(Job.key_for(job_id.decode()), "enqueued_at")
        enqueued = [t.decode() for t in pipe.execute() if t]
    return enqueued[0] if enqueued else None


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
                # A message waiting out quiet hours is not lost before its time: its job is scheduled for
                # `not_before`, and is given `STALE_AFTER` from then, like any job from its last touch.
                or_(OutboundMessage.not_before.is_(None), OutboundMessage.not_before < cutoff),
            )
            .order_by(OutboundMessage.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)  # a locked row is being sent right now
        ).all()
        if not rows:
            db.session.commit()
            return requeued
        after = rows[-1].id
        waiting = _jobs_waiting([message_job_id(r.id) for r in rows], get_queue())
        lost = [r for r, will_run in zip(rows, waiting, strict=True) if not will_run]
        if lost:
            # Touching them keeps the next run from re-enqueueing them again before they are stale.
            db.session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_([r.id for r in lost]))
                .values(updated_at=clock.now())
                .execution_options(synchronize_session=False)
            )
        db.session.commit()
        requeued += enqueue_messages((r.id, r.retry_count) for r in lost)


def requeue_stale_imports() -> int:
    """Re-enqueue the jobs of imports left queued or running, untouched for `STALE_AFTER` seconds,
    whose job is not waiting in Redis; returns how many."""
    cutoff = clock.now() - timedelta(seconds=current_app.config["STALE_AFTER"])
    stale = db.session.scalars(
        select(CustomerImport.id)
        .where(CustomerImport.status.in_(ImportStatus.ACTIVE), CustomerImport.updated_at < cutoff)
        .order_by(CustomerImport.id)
        .limit(current_app.config["RECONCILE_BATCH_SIZE"])
    ).all()
    if not stale:
        db.session.commit()
        return 0
    waiting = _jobs_waiting([import_jobs.import_job_id(i) for i in stale], get_control_queue())
    lost = [i for i, will_run in zip(stale, waiting, strict=True) if not will_run]
    if lost:
        # Touched, so that the next pass leaves them to the job until they are stale again.
        db.session.execute(
            update(CustomerImport)
            .where(CustomerImport.id.in_(lost), CustomerImport.status.in_(ImportStatus.ACTIVE))
            .values(updated_at=clock.now())
            .execution_options(synchronize_session=False)
        )
    db.session.commit()
    for import_id in lost:
        import_jobs.enqueue_import(import_id)
    return len(lost)


def reconcile() -> ReconcileReport:
    """One pass of the five steps above."""
    report = ReconcileReport(dispatched=dispatch_due_campaigns())
    sending = db.session.scalars(select(Campaign.id).where(Campaign.status == CampaignStatus.SENDING)).all()
    db.session.commit()
    for campaign_id in sending:
        report.requeued += requeue_stale_messages(campaign_id)
        # finish_campaign checks for pending messages itself, and does nothing when there are some.
        status = lifecycle.finish_campaign(campaign_id)
        if status:
            report.finalized[campaign_id] = status
    report.applied_receipts = receipts.apply_waiting()
    report.requeued_imports = requeue_stale_imports()
    if report.dispatched or report.requeued or report.finalized or report.applied_receipts or report.requeued_imports:
        log.info(
            "reconciled",
            extra={
                "dispatched": report.dispatched,
                "requeued": report.requeued,
                "finalized": report.finalized,
                "applied_receipts": report.applied_receipts,
                "requeued_imports": report.requeued_imports,
            },
        )
    return report
