"""Set-based creation of outbound messages, enqueueing their jobs, and campaign completion.

The rules every function here keeps:
- rows are created by one `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so a customer has at most
  one message per campaign however often `/send` is called;
- jobs are enqueued only after the rows they name are committed;
- a job id is derived from the message id, so a job can be looked up (and re-enqueued) from the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from redis.exceptions import RedisError
from rq import Queue, Retry
from sqlalchemy import ColumnElement, and_, exists, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.database import statement_budget
from app.extensions import db, get_control_queue, get_queue, get_redis
from app.messaging.message_store import pending_exists, pending_exists_now
from app.models import Campaign, CampaignStatus, Customer, MessageStatus, OutboundMessage

SEND_JOB = "app.messaging.jobs.send_outbound_message"
ENQUEUE_RANGE_JOB = "app.messaging.jobs.enqueue_campaign_range"
# Fan-out and reconcile jobs walk whole campaigns: give them time.
LONG_JOB_TIMEOUT = 3600


def message_job_id(message_id: int) -> str:
    """The RQ job id of an outbound message (RQ allows letters, digits, `_` and `-`)."""
    return f"outbound_message-{message_id}"


@dataclass(frozen=True)
class NewRows:
    """What one bulk insert created: how many rows, and the id range they lie in."""

    count: int
    first_id: int | None
    last_id: int | None


def create_pending_messages(campaign_id: int, audience: ColumnElement[bool]) -> NewRows:
    """Insert a pending message for every customer matching `audience` who has none in the campaign.

    One statement, in the caller's transaction; the caller commits. On PostgreSQL it runs with
    `SEND_STATEMENT_TIMEOUT` for the rest of the transaction: a million recipients take about 9 s.
    """
    now = clock.now()
    source = select(
        literal(campaign_id),
        Customer.id,
        literal(MessageStatus.PENDING),
        literal(0),
        literal(now, OutboundMessage.created_at.type),
        literal(now, OutboundMessage.updated_at.type),
    ).where(audience)
    # A key-share lock on each customer read, held until the commit: a concurrent delete of one of them
    # waits for this send and then sees its message (app.customers.service.delete_customer).
    source = source.with_for_update(read=True, key_share=True)
    columns = ["campaign_id", "customer_id", "status", "retry_count", "created_at", "updated_at"]
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(OutboundMessage)
        .from_select(columns, source)
        .on_conflict_do_nothing(index_elements=["customer_id", "campaign_id"])
        .returning(OutboundMessage.id)
    )
    if dialect == "postgresql":
        # Count in the database: a 100k-row insert sends back three numbers, not 100k ids.
        inserted = stmt.cte("inserted")
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            count, first, last = db.session.execute(
                select(func.count(), func.min(inserted.c.id), func.max(inserted.c.id))
            ).one()
        return NewRows(count, first, last)
    count, first, last = 0, None, None
    for (message_id,) in db.session.execute(stmt):
        count += 1
        first = message_id if first is None else min(first, message_id)
        last = message_id if last is None else max(last, message_id)
    return NewRows(count, first, last)


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
    """After the commit of `rows`: enqueue their jobs, inline when few, else through a fan-out job
    so the request answers fast whatever the audience size. Returns how many messages are queued
    (all of a fan-out's once its job is in Redis); raises `EnqueueInterrupted` if Redis fails."""
    if not rows.count:
        return 0
    if rows.count <= current_app.config["ENQUEUE_INLINE_LIMIT"]:
        return enqueue_messages(pending_messages(campaign_id, rows.first_id, rows.last_id))
    try:
        _enqueue_fan_out(campaign_id, rows)
    except RedisError as exc:
        raise EnqueueInterrupted(0) from exc
    return rows.count


def _enqueue_fan_out(campaign_id: int, rows: NewRows) -> None:
    """Queue the job that enqueues the rows' send jobs in batches (one job, on the control queue)."""
    get_control_queue().enqueue(
        ENQUEUE_RANGE_JOB,
        args=(campaign_id, rows.first_id, rows.last_id),
        job_id=f"enqueue_campaign-{campaign_id}-{rows.first_id}-{rows.last_id}",
        job_timeout=LONG_JOB_TIMEOUT,
        result_ttl=0,
        retry=Retry(max=3, interval=[1, 5, 30]),
    )


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


def _has_messages(campaign_id: int, status: str | None = None) -> bool:
    cond = [OutboundMessage.campaign_id == campaign_id]
    if status:
        cond.append(OutboundMessage.status == status)
    return bool(db.session.scalar(select(exists().where(and_(*cond)))))


def finalize_campaign(campaign_id: int, pending_checked: bool = False) -> str | None:
    """If the `sending` campaign has no pending message left, end it: `sent` when at least one message
    was sent, else `failed` with the reason. Returns the new status, or None when nothing changed.

    Call after the commit of the message that may have been the last (`pending_checked` when the
    caller has just seen, after that commit, that nothing is pending). Safe when several workers
    finish the last messages at once: the campaign row is locked before the final count, so the count
    sees every commit that came before, and only one caller moves it out of `sending`.
    """
    if not pending_checked and pending_exists_now(campaign_id):
        return None  # the common case: one indexed lookup, no lock, no transaction
    locked = db.session.scalar(
        select(Campaign.id)
        .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.SENDING)
        .with_for_update()
    )
    if locked is None or pending_exists(db.session, campaign_id):
        db.session.commit()
        return None
    if _has_messages(campaign_id, MessageStatus.SENT):
        status, reason = CampaignStatus.SENT, None
    elif _has_messages(campaign_id):
        status, reason = CampaignStatus.FAILED, "no message could be sent"
    else:
        status, reason = CampaignStatus.FAILED, "the campaign had no recipients when it was dispatched"
    db.session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(status=status, status_reason=reason, updated_at=clock.now())
    )
    db.session.commit()
    return status


def start_due_campaign(campaign_id: int, now: datetime | None = None) -> bool:
    """Move a `scheduled` campaign whose time has come to `sending`, in one conditional UPDATE, so a
    trigger that fires twice dispatches once. Commits; True when this call made the move."""
    now = now or clock.now()
    result = db.session.execute(
        update(Campaign)
        .where(
            Campaign.id == campaign_id,
            Campaign.status == CampaignStatus.SCHEDULED,
            Campaign.scheduled_at <= now,
        )
        .values(status=CampaignStatus.SENDING, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    return result.rowcount == 1


def dispatch_campaign(campaign_id: int, now: datetime | None = None) -> int | None:
    """Start a due scheduled campaign and enqueue all its pending messages; one with none ends
    `failed` at once. Idempotent: returns how many were queued, or None when it was not due or was
    already dispatched."""
    if not start_due_campaign(campaign_id, now):
        return None
    queued = enqueue_messages(pending_messages(campaign_id))
    if not queued:
        finalize_campaign(campaign_id)
    return queued
