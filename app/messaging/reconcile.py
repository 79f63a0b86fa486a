"""The reconciler: PostgreSQL is the truth, and this makes Redis agree with it again.

It runs every `RECONCILE_INTERVAL` seconds and
1. dispatches due `scheduled` campaigns that nothing dispatched (scheduler down, Redis flushed);
2. puts back in line the messages whose claim's lease has passed (their worker was killed, or hung past
   its job's timeout): their send is in doubt (the provider may have taken it), so each is logged and
   counted (`dispatch_messages_total{outcome="in_doubt"}`) before it is sent again;
3. for each `sending` campaign: puts back in line its queued messages whose job Redis no longer holds
   (a flushed Redis, a worker killed between taking a job and claiming), untouched for `STALE_AFTER`
   seconds; refills its window; and ends it when nothing is left;
4. cancels what canceled campaigns still have waiting (a cancel cut short);
5. applies delivery receipts kept because their message's provider id was not recorded yet (every one whose
   message now exists), and deletes those kept longer than `KEPT_RECEIPT_TTL` (counted);
6. re-enqueues customer imports left `queued` or `running`, untouched for `STALE_AFTER` seconds, whose
   job is not waiting in Redis (a flushed Redis, a killed worker); the job resumes where the import was;
7. re-enqueues the adding of a send's recipients whose last batch committed over
   `recipient_batches.ADDING_STALE` ago (its job lost); it resumes after the last customer added;
8. (before step 3) creates the SMS fallbacks that are due and were not created: a not-delivered window that
   passed with its scheduled check lost, or a trigger lost between a failure's record and its fallback
   (`fallback.sweep`); step 3 then queues them.
It works in batches and is safe beside workers and beside itself: every move is a conditional UPDATE,
rows another transaction holds are skipped, and a job from an earlier turn of a message claims nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from rq import Queue
from rq.job import Job, JobStatus
from sqlalchemy import select, update

from app import clock, metrics
from app.customers import import_jobs
from app.extensions import db
from app.messaging import deferred, fallback, lifecycle, receipts, recipient_batches
from app.messaging.send import window
from app.messaging.triggers import dispatch_due_campaign
from app.models import Campaign, CampaignStatus, CustomerImport, ImportStatus, MessageStatus, OutboundMessage
from app.queues import get_control_queue, get_queue, get_redis

log = logging.getLogger(__name__)

# A job in one of these states will run without help.
_WAITING = {JobStatus.QUEUED.value, JobStatus.SCHEDULED.value, JobStatus.DEFERRED.value}


@dataclass
class ReconcileReport:
    dispatched: list[int] = field(default_factory=list)
    in_doubt: int = 0
    requeued: int = 0
    refilled: int = 0
    finalized: dict[int, str] = field(default_factory=dict)
    canceled: int = 0
    requeued_imports: int = 0
    applied_receipts: int = 0
    expired_receipts: int = 0
    applied_deferred: int = 0
    resumed_adding: list[int] = field(default_factory=list)
    fallbacks: int = 0

    def summary(self) -> str:
        return (
            f"dispatched {self.dispatched}, applied from Redis {self.applied_deferred}, in doubt {self.in_doubt}, "
            f"requeued {self.requeued}, "
            f"refilled {self.refilled}, finalized {self.finalized}, canceled {self.canceled}, "
            f"applied receipts {self.applied_receipts}, expired receipts {self.expired_receipts}, "
            f"requeued imports {self.requeued_imports}, resumed adding {self.resumed_adding}, "
            f"fallbacks {self.fallbacks}"
        )

    def __bool__(self) -> bool:
        return bool(
            self.dispatched
            or self.applied_deferred
            or self.in_doubt
            or self.requeued
            or self.refilled
            or self.finalized
            or self.canceled
            or self.applied_receipts
            or self.expired_receipts
            or self.requeued_imports
            or self.resumed_adding
            or self.fallbacks
        )


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


def release_expired_claims() -> int:
    """Put back in line every message whose claim's lease has passed; returns how many. Each is a send in
    doubt: logged with its ids and counted, so that an operator sees what may reach a recipient twice."""
    batch = current_app.config["RECONCILE_BATCH_SIZE"]
    total = 0
    while True:
        released = lifecycle.release_expired_claims(clock.now(), batch)
        db.session.commit()
        for message_id, campaign_id in released:
            log.warning(
                "a claim's lease passed: the send is in doubt, and the message is sent again",
                extra={"message_id": message_id, "campaign_id": campaign_id},
            )
        metrics.count_in_doubt(len(released))
        total += len(released)
        if len(released) < batch:
            return total


def requeue_lost_jobs(campaign_id: int) -> int:
    """Put back in line the campaign's queued messages, untouched for `STALE_AFTER` seconds, whose job
    will not run by itself; returns how many. (A window holds a few hundred: one pass reads them all.)"""
    config = current_app.config
    cutoff = clock.now() - timedelta(seconds=config["STALE_AFTER"])
    rows = db.session.execute(
        select(OutboundMessage.id, OutboundMessage.job_seq)
        .where(
            OutboundMessage.campaign_id == campaign_id,
            OutboundMessage.status == MessageStatus.QUEUED,
            OutboundMessage.updated_at < cutoff,
        )
        .order_by(OutboundMessage.id)
        .limit(config["RECONCILE_BATCH_SIZE"])
    ).all()
    db.session.commit()
    if not rows:
        return 0
    waiting = _jobs_waiting([window.message_job_id(r.id, r.job_seq) for r in rows], get_queue())
    lost = [(r.id, r.job_seq) for r, will_run in zip(rows, waiting, strict=True) if not will_run]
    moved = lifecycle.unqueue_lost(lost, clock.now())
    db.session.commit()
    return moved


def cancel_leftovers() -> int:
    """Cancel what canceled campaigns still have waiting (a cancel whose batches were cut short: the
    request ran out of time and its job was lost, say); returns how many messages."""
    leftovers = db.session.scalars(
        select(Campaign.id).where(
            Campaign.status == CampaignStatus.CANCELED,
            select(OutboundMessage.id)
            .where(
                OutboundMessage.campaign_id == Campaign.id,
                OutboundMessage.status.in_((MessageStatus.PENDING, MessageStatus.QUEUED)),
            )
            .exists(),
        )
    ).all()
    db.session.commit()
    return sum(lifecycle.cancel_all_waiting(campaign_id)[0] for campaign_id in leftovers)


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
    """One pass of the eight steps above."""
    report = ReconcileReport(dispatched=dispatch_due_campaigns())
    # A send whose record waits in Redis (the database was unavailable) holds its claim until then: its
    # record goes in first, so that its lease running out meanwhile does not send it again.
    report.applied_deferred = deferred.drain()
    report.in_doubt = release_expired_claims()
    report.fallbacks = fallback.sweep()
    sending = db.session.scalars(select(Campaign.id).where(Campaign.status == CampaignStatus.SENDING)).all()
    db.session.commit()
    for campaign_id in sending:
        report.requeued += requeue_lost_jobs(campaign_id)
        report.refilled += window.refill(campaign_id, wait=True).queued
        # finish_campaign checks for unfinished messages itself, and does nothing when there are some.
        status = lifecycle.finish_campaign(campaign_id)
        if status:
            report.finalized[campaign_id] = status
    report.canceled = cancel_leftovers()
    report.applied_receipts = receipts.apply_waiting()
    report.expired_receipts = receipts.expire_kept()
    report.requeued_imports = requeue_stale_imports()
    report.resumed_adding = recipient_batches.resume_stalled()
    if report:
        log.info(
            "reconciled",
            extra={
                "dispatched": report.dispatched,
                "applied_deferred": report.applied_deferred,
                "in_doubt": report.in_doubt,
                "requeued": report.requeued,
                "refilled": report.refilled,
                "finalized": report.finalized,
                "canceled": report.canceled,
                "applied_receipts": report.applied_receipts,
                "expired_receipts": report.expired_receipts,
                "requeued_imports": report.requeued_imports,
                "resumed_adding": report.resumed_adding,
                "fallbacks": report.fallbacks,
            },
        )
    return report
