"""A sending campaign's window: the few of its messages whose send jobs are in Redis at a time.

Redis holds a window, not the audience. A sending campaign has at most its window's size of messages
`queued` (their job in Redis) or `sending` (claimed by a worker); the rest wait `pending` in PostgreSQL. A
refill tops the window up: it moves the next pending messages to `queued` (those held by quiet hours whose
time has come first, then the others in id order), commits, and only then enqueues their jobs. Send jobs
refill as they finish (`should_refill`), so the window follows the workers without polling; the
reconciler refills too, after a Redis flush or a killed worker.

Every campaign's jobs share one queue, so campaigns sending at once share the workers: each has its window
in the line, and a campaign's share of the sends is its window's share of the line (Little's law). Its
`priority` weighs its window (`WEIGHTS`).

A message's job id is `outbound_message-<id>-<job_seq>`, and `job_seq` counts up each time the message
enters the window: a refill that runs twice, or one racing the reconciler, enqueues at worst a job no
claim will accept (`lifecycle.CLAIM` names the job's `job_seq`). Memory in Redis is the windows' jobs
(about 1.5 KB each), whatever the campaigns' sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from rq import Queue, Retry
from sqlalchemy import func, select

from app import clock
from app.extensions import db
from app.messaging import lifecycle
from app.models import Campaign, CampaignPriority, CampaignStatus
from app.queues import get_control_queue, get_queue, get_redis

log = logging.getLogger(__name__)

SEND_JOB = "app.messaging.jobs.send_outbound_message"
REFILL_JOB = "app.messaging.jobs.refill_window"
# A campaign's window is SEND_WINDOW times its priority's weight.
WEIGHTS = {CampaignPriority.HIGH: 2.0, CampaignPriority.NORMAL: 1.0, CampaignPriority.LOW: 0.5}
# The key of the transaction-level advisory lock a refill takes with the campaign's id: one refill of a
# campaign at a time (the others find it taken and leave it to that one).
REFILL_LOCK = 7_310_002


def message_job_id(message_id: int, job_seq: int) -> str:
    """The RQ job id of a message's turn in the window (RQ allows letters, digits, `_` and `-`)."""
    return f"outbound_message-{message_id}-{job_seq}"


def queued_before(campaign_id: int, own_queued: int) -> int | None:
    """How many send jobs of other campaigns are in the send queue beside the campaign's `own_queued`
    (about: a job a worker has just taken may still count): its messages share the line with them, and wait
    behind those queued before. None when Redis does not answer."""
    try:
        in_line = get_queue().count
    except RedisError:
        log.warning("could not count the send queue", extra={"campaign_id": campaign_id})
        return None
    return max(0, in_line - own_queued)


def window_size(priority: str) -> int:
    """How many messages of a campaign of `priority` may be queued or sending at once."""
    return max(1, round(current_app.config["SEND_WINDOW"] * WEIGHTS.get(priority, 1.0)))


def refill_step(size: int) -> int:
    """How far below its size a window falls before a send job refills it: a refill then queues a batch,
    not one job per send."""
    return max(1, size // 10)


def should_refill(in_window: int, size: int, pending: bool) -> bool:
    """Whether a send job that finds `in_window` messages queued or sending, and (`pending`) some waiting,
    tops the window up."""
    return pending and in_window <= size - refill_step(size)


def _retry_for(retry_count: int) -> Retry | None:
    """RQ's retry policy for a message that has already used `retry_count` retries. The delays are not
    set here: the worker that runs a failed attempt applies its own `RETRY_INTERVALS` (see `AppWorker`)."""
    left = current_app.config["MAX_RETRIES"] - retry_count
    if left <= 0:
        return None
    return Retry(max=left)


class EnqueueInterrupted(RedisError):
    """Redis failed part-way through an enqueue: `queued` jobs reached Redis before it did."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"Redis failed after {queued} jobs were queued")
        self.queued = queued


@dataclass(frozen=True)
class Refill:
    """What a refill did: jobs that reached Redis, and messages it queued whose job did not (Redis failed:
    the reconciler puts them back in line)."""

    queued: int = 0
    lost: int = 0


def refill(campaign_id: int, wait: bool = False) -> Refill:
    """Top the sending campaign's window up to its size, in a transaction of its own, then enqueue the
    jobs of the messages it queued (nothing when the campaign is not sending, its window is full, or
    nothing waits). Another refill of the campaign running now is left to do it, unless `wait` (the
    reconciler, which may just have put messages back in line that the other did not see): then this one
    runs after it. A Redis failure is logged, not raised."""
    try:
        rows = _queue_next(campaign_id, wait)
    except Exception:
        db.session.rollback()
        raise
    if not rows:
        return Refill()
    try:
        return Refill(enqueue_jobs(rows))
    except EnqueueInterrupted as exc:
        log.warning(
            "could not enqueue a window refill; the reconciler will",
            extra={"campaign_id": campaign_id, "queued": exc.queued, "left": len(rows) - exc.queued},
        )
        return Refill(exc.queued, len(rows) - exc.queued)


def _queue_next(campaign_id: int, wait: bool) -> list[tuple[int, int, int]]:
    if db.session.get_bind().dialect.name == "postgresql":
        if wait:
            db.session.execute(select(func.pg_advisory_xact_lock(REFILL_LOCK, campaign_id)))
        elif not db.session.scalar(select(func.pg_try_advisory_xact_lock(REFILL_LOCK, campaign_id))):
            db.session.rollback()
            return []
    campaign = db.session.execute(select(Campaign.status, Campaign.priority).where(Campaign.id == campaign_id)).first()
    if campaign is None or campaign.status != CampaignStatus.SENDING:
        db.session.rollback()
        return []
    size = window_size(campaign.priority)
    state = db.session.execute(lifecycle.WINDOW_STATE, {"campaign_id": campaign_id, "cap": size}).one()
    room = size - state.in_window
    rows = lifecycle.queue_next(campaign_id, room, clock.now()) if room > 0 and state.pending else []
    db.session.commit()
    return rows


def enqueue_jobs(rows: Iterable[tuple[int, int, int]], queue: Queue | None = None) -> int:
    """Enqueue one send job per `(message_id, job_seq, retry_count)`, pipelined in batches; returns how
    many. Each batch is one MULTI/EXEC: in Redis whole or not at all. If Redis fails, raises
    `EnqueueInterrupted` with the count of the batches that were."""
    queue = queue or get_queue()
    config = current_app.config
    batch_size = config["ENQUEUE_BATCH_SIZE"]
    total = 0
    batch = []
    for message_id, job_seq, retry_count in rows:
        batch.append(
            Queue.prepare_data(
                SEND_JOB,
                args=(message_id, job_seq),
                job_id=message_job_id(message_id, job_seq),
                retry=_retry_for(retry_count),
                timeout=config["JOB_TIMEOUT"],
                # The row is the truth; a finished job lingers briefly.
                result_ttl=config["JOB_RESULT_TTL"],
                description=f"send outbound message {message_id}",
            )
        )
        if len(batch) >= batch_size:
            total += _flush(queue, batch, total)
            batch = []
    if batch:
        total += _flush(queue, batch, total)
    return total


def _flush(queue: Queue, batch: list, queued_before: int) -> int:
    try:
        with get_redis().pipeline() as pipe:
            queue.enqueue_many(batch, pipeline=pipe)
            pipe.execute()
    except RedisError as exc:
        raise EnqueueInterrupted(queued_before) from exc
    return len(batch)


def refill_job_id(campaign_id: int, at: datetime) -> str:
    return f"refill_window-{campaign_id}-{int(at.timestamp())}"


def schedule_refill(campaign_id: int, at: datetime) -> None:
    """A refill of the campaign's window at `at` (when messages held by quiet hours may go), on the control
    queue: one per campaign and second, however many messages wait for that time. RQ counts the delay on
    its own clock. If Redis fails, the reconciler refills the window on its next pass after `at` anyway."""
    delay = max(1.0, (at - clock.now()).total_seconds())
    try:
        get_control_queue().enqueue_in(
            timedelta(seconds=delay),
            REFILL_JOB,
            args=(campaign_id,),
            job_id=refill_job_id(campaign_id, at),
            result_ttl=0,
            description=f"refill the window of campaign {campaign_id}",
        )
    except RedisError:
        log.warning("could not schedule a window refill", extra={"campaign_id": campaign_id}, exc_info=True)


CANCEL_JOB = "app.messaging.jobs.cancel_waiting_messages"


def enqueue_cancel(campaign_id: int) -> None:
    """Leave the rest of a canceled campaign's waiting messages to a job of the control queue; if Redis
    fails, the reconciler cancels them on its next pass."""
    try:
        get_control_queue().enqueue(
            CANCEL_JOB,
            args=(campaign_id,),
            job_id=f"cancel_waiting-{campaign_id}",
            job_timeout=3600,
            result_ttl=0,
            description=f"cancel the waiting messages of campaign {campaign_id}",
        )
    except RedisError:
        log.warning("could not enqueue the rest of a cancel", extra={"campaign_id": campaign_id}, exc_info=True)
