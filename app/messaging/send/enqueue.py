"""Queueing send jobs, after the rows they name are committed.

A job id is derived from the message id, so a job can be looked up (and re-enqueued) from its row.
Few jobs are enqueued by the caller, pipelined; many by a fan-out job on the control queue, so that a
request answers fast whatever the audience size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flask import current_app
from redis.exceptions import RedisError
from rq import Queue, Retry
from sqlalchemy import select

from app.extensions import db
from app.messaging.recipients import NewRows
from app.models import MessageStatus, OutboundMessage
from app.queues import get_control_queue, get_queue, get_redis

SEND_JOB = "app.messaging.jobs.send_outbound_message"
FAN_OUT_JOB = "app.messaging.jobs.fan_out_pending_messages"
# Fan-out jobs walk whole campaigns: give them time.
LONG_JOB_TIMEOUT = 3600


def message_job_id(message_id: int) -> str:
    """The RQ job id of an outbound message (RQ allows letters, digits, `_` and `-`)."""
    return f"outbound_message-{message_id}"


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


def enqueue_messages(messages: Iterable[tuple[int, int]], queue: Queue | None = None) -> int:
    """Enqueue one send job per `(message_id, retry_count)`, pipelined in batches; returns how many.

    Each batch is one MULTI/EXEC: it is in Redis whole or not at all. If Redis fails, raises
    `EnqueueInterrupted` with the count of the batches that were; the rest stay pending rows for the
    reconciler. (A batch whose answer was lost in a stall counts as not queued, though Redis may have
    run it; the reconciler then finds its jobs waiting and leaves them alone.)"""
    queue = queue or get_queue()
    batch_size = current_app.config["ENQUEUE_BATCH_SIZE"]
    timeout = current_app.config["JOB_TIMEOUT"]
    total = 0
    batch = []
    for message_id, retry_count in messages:
        batch.append(
            Queue.prepare_data(
                SEND_JOB,
                args=(message_id,),
                job_id=message_job_id(message_id),
                retry=_retry_for(retry_count),
                timeout=timeout,
                # The row is the truth; a finished job lingers briefly. (Deleting it at once, result_ttl=0,
                # costs RQ about a quarter of its throughput.)
                result_ttl=current_app.config["JOB_RESULT_TTL"],
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


def pending_messages(
    campaign_id: int, first_id: int | None = None, last_id: int | None = None, batch_size: int = 5000
) -> Iterator[tuple[int, int]]:
    """`(id, retry_count)` of the campaign's pending messages, by id, read in keyset batches."""
    after = (first_id - 1) if first_id is not None else 0
    while True:
        stmt = (
            select(OutboundMessage.id, OutboundMessage.retry_count)
            .where(
                OutboundMessage.campaign_id == campaign_id,
                OutboundMessage.status == MessageStatus.PENDING,
                OutboundMessage.id > after,
            )
            .order_by(OutboundMessage.id)
            .limit(batch_size)
        )
        if last_id is not None:
            stmt = stmt.where(OutboundMessage.id <= last_id)
        rows = db.session.execute(stmt).all()
        db.session.commit()  # hold no snapshot or lock between batches
        if not rows:
            return
        yield from ((r.id, r.retry_count) for r in rows)
        after = rows[-1].id


def enqueue_new_rows(campaign_id: int, rows: NewRows) -> int:
    """After the commit of `rows`: enqueue their jobs. Returns how many messages are queued (all of a
    fan-out's once its job is in Redis); raises `EnqueueInterrupted` if Redis fails."""
    if not rows.count:
        return 0
    return _enqueue(campaign_id, rows.count, rows.first_id, rows.last_id)


def enqueue_all_pending(campaign_id: int, count: int) -> int:
    """After a campaign starts: enqueue the jobs of all its `count` pending messages (recipients stored
    while it was scheduled among them). Returns and raises as `enqueue_new_rows`."""
    return _enqueue(campaign_id, count, None, None)


def _enqueue(campaign_id: int, count: int, first_id: int | None, last_id: int | None) -> int:
    """Inline when `count` is within `ENQUEUE_INLINE_LIMIT`, else through one fan-out job."""
    if count <= current_app.config["ENQUEUE_INLINE_LIMIT"]:
        return enqueue_messages(pending_messages(campaign_id, first_id, last_id))
    span = f"{first_id}-{last_id}" if first_id is not None else "all"
    try:
        get_control_queue().enqueue(
            FAN_OUT_JOB,
            args=(campaign_id, first_id, last_id),
            job_id=f"enqueue_campaign-{campaign_id}-{span}",
            job_timeout=LONG_JOB_TIMEOUT,
            result_ttl=0,
            retry=Retry(max=3, interval=[1, 5, 30]),
        )
    except RedisError as exc:
        raise EnqueueInterrupted(0) from exc
    return count
