"""What RQ runs. Jobs take ids, load what they need, and are safe to run twice."""

from __future__ import annotations

import logging

from flask import current_app
from rq import get_current_job
from sqlalchemy import bindparam, func, select, update

from app import clock
from app.extensions import db
from app.messaging import dispatch
from app.messaging.reconcile import reconcile as reconcile_pass
from app.messaging.senders import OutgoingMessage, SendResult, get_sender
from app.messaging.templates import render
from app.models import Campaign, Customer, MessageStatus, OutboundMessage

log = logging.getLogger(__name__)


class SendAttemptFailed(Exception):
    """Raised after a failed attempt has been recorded, so that RQ schedules the retry."""


def _rq_will_retry() -> bool:
    job = get_current_job()
    return bool(job is not None and job.retries_left)


# Built once: the hot path only binds parameters (SQLAlchemy's compiled cache does the rest).
_LOAD_FOR_SEND = (
    select(
        OutboundMessage.status,
        OutboundMessage.retry_count,
        OutboundMessage.campaign_id,
        Campaign.channel,
        Campaign.base_template,
        Customer.phone,
        Customer.first_name,
        Customer.last_name,
        Customer.location,
        Customer.preferred_product,
    )
    .join(Campaign, Campaign.id == OutboundMessage.campaign_id)
    .outerjoin(Customer, Customer.id == OutboundMessage.customer_id)
    .where(OutboundMessage.id == bindparam("message_id"))
    # Two workers never send one message at once: the second skips the row the first holds.
    .with_for_update(of=OutboundMessage, skip_locked=True)
)
_RECORD_ATTEMPT = (
    update(OutboundMessage)
    .where(OutboundMessage.id == bindparam("message_id"))
    .values(
        status=bindparam("new_status"),
        rendered_content=bindparam("body"),
        last_error=func.coalesce(bindparam("error"), OutboundMessage.last_error),  # a success keeps the history
        retry_count=bindparam("retries_used"),
        updated_at=bindparam("now"),
    )
)


def send_outbound_message(message_id: int) -> str:
    """Render and send one pending message, record the result and commit.

    A message that is not pending (already sent, or failed for good) is left alone, and a message whose
    row another worker holds is skipped: a job that runs twice never sends twice. A failed attempt that
    RQ will retry leaves the message pending with `retry_count` + 1, then raises so that RQ retries;
    the last failed attempt marks it `failed`. Database work: one locked read, one update, one commit,
    and the completion check.
    """
    # Core on the session's connection: none of the ORM's bookkeeping on the hot path.
    conn = db.session.connection()
    row = conn.execute(_LOAD_FOR_SEND, {"message_id": message_id}).one_or_none()
    if row is None:
        db.session.rollback()
        return "skipped: missing, or being sent by another worker"
    if row.status != MessageStatus.PENDING:
        db.session.rollback()
        # The run that recorded it may have died before the completion step.
        dispatch.finalize_campaign(row.campaign_id)
        return f"skipped: already {row.status}"

    if row.phone is None:
        return _record_final(message_id, row.campaign_id, row.retry_count, "the customer no longer exists")

    body = render(row.base_template, row._mapping)
    outgoing = OutgoingMessage(
        message_id=message_id,
        campaign_id=row.campaign_id,
        channel=row.channel,
        phone=row.phone,
        body=body,
        attempt=row.retry_count + 1,
    )
    try:
        result = get_sender(current_app._get_current_object()).send(outgoing)
    except Exception as exc:  # noqa: BLE001 - a provider timeout or crash is a failed attempt like any other
        log.warning("sender raised", extra={"campaign_id": row.campaign_id, "message_id": message_id}, exc_info=True)
        result = SendResult(False, f"sender error: {type(exc).__name__}: {exc}"[:1000])

    will_retry = not result.ok and _rq_will_retry()
    if result.ok:
        status, retries_used = MessageStatus.SENT, row.retry_count
    elif will_retry:
        status, retries_used = MessageStatus.PENDING, row.retry_count + 1
    else:
        status, retries_used = MessageStatus.FAILED, row.retry_count
    conn.execute(
        _RECORD_ATTEMPT,
        {
            "message_id": message_id,
            "new_status": status,
            "body": body,
            "error": None if result.ok else result.error,
            "retries_used": retries_used,
            "now": clock.now(),
        },
    )
    db.session.commit()
    extra = {"campaign_id": row.campaign_id, "message_id": message_id, "status": status}
    if will_retry:
        log.info("send attempt failed; RQ will retry", extra={**extra, "error": result.error})
        raise SendAttemptFailed(f"message {message_id}: {result.error}")
    dispatch.finalize_campaign(row.campaign_id)
    log.info("message %s", status, extra=extra)
    return status


def _record_final(message_id: int, campaign_id: int, retry_count: int, error: str) -> str:
    """Fail a message that can never be sent, without an attempt, and complete its campaign."""
    db.session.connection().execute(
        _RECORD_ATTEMPT,
        {
            "message_id": message_id,
            "new_status": MessageStatus.FAILED,
            "body": None,
            "error": error,
            "retries_used": retry_count,
            "now": clock.now(),
        },
    )
    db.session.commit()
    dispatch.finalize_campaign(campaign_id)
    log.warning("message failed: %s", error, extra={"campaign_id": campaign_id, "message_id": message_id})
    return MessageStatus.FAILED


def enqueue_campaign_range(campaign_id: int, first_id: int, last_id: int) -> str:
    """Fan-out: enqueue the send jobs of the campaign's pending messages with ids in the range."""
    count = dispatch.enqueue_messages(
        dispatch.pending_messages(campaign_id, first_id, last_id, current_app.config["RECONCILE_BATCH_SIZE"])
    )
    return f"enqueued {count}"


def dispatch_campaign(campaign_id: int) -> str:
    """The scheduler's trigger at a campaign's `scheduled_at`: start it and enqueue its messages."""
    queued = dispatch.dispatch_campaign(campaign_id)
    return "not due, or already dispatched" if queued is None else f"dispatched: {queued} queued"


def reconcile() -> str:
    """The periodic self-healing pass (see `app.messaging.reconcile`)."""
    report = reconcile_pass()
    return f"dispatched {report.dispatched}, requeued {report.requeued}, finalized {report.finalized}"
