"""What RQ runs. Jobs take ids, load what they need, and are safe to run twice."""

from __future__ import annotations

import logging

from flask import current_app
from rq import get_current_job

from app.messaging import lifecycle
from app.messaging.message_store import Outcome, open_store, record_through_outage
from app.messaging.queueing import enqueue_messages, pending_messages
from app.messaging.reconcile import reconcile
from app.messaging.scheduling import dispatch_due_campaign
from app.messaging.senders import OutgoingMessage, SendResult, get_sender
from app.messaging.templates import over_limit, render
from app.models import MessageStatus

log = logging.getLogger(__name__)


class SendAttemptFailed(Exception):
    """Raised after a failed attempt has been recorded, so that RQ schedules the retry."""


def _rq_will_retry() -> bool:
    job = get_current_job()
    return bool(job is not None and job.retries_left)


def send_outbound_message(message_id: int) -> str:
    """Render and send one pending message, record the outcome and commit.

    A message that is not pending (already sent, or failed for good) is left alone, and a message whose
    row another worker holds is skipped: a job that runs twice never sends twice. A failed attempt that
    RQ will retry leaves the message pending with `retry_count` + 1, then raises so that RQ retries;
    the last failed attempt marks it `failed`. Database work: a locked read, then the update, its
    commit and the completion check (two round trips on PostgreSQL, see `message_store`). If the
    database becomes unavailable after the attempt, the record is retried for `RECORD_RETRY_WINDOW`
    seconds: only a longer outage leaves the message pending, to be sent again (same idempotency key).
    """
    with open_store() as store:
        row = store.load(message_id)
        if row is None:
            return "skipped: missing, or being sent by another worker"
        campaign_id = row["campaign_id"]
        outcome = _attempt_and_decide(message_id, row) if row["status"] == MessageStatus.PENDING else None
        if outcome is not None:
            pending_left = record_through_outage(store, message_id, campaign_id, outcome, _record_window())
    if outcome is None:
        lifecycle.finish_campaign(campaign_id)  # the run that recorded it may have died before this step
        return f"skipped: already {row['status']}"
    extra = {"campaign_id": campaign_id, "message_id": message_id, "status": outcome.status}
    if outcome.will_retry:
        log.info("send attempt failed; RQ will retry", extra={**extra, "error": outcome.error})
        raise SendAttemptFailed(f"message {message_id}: {outcome.error}")
    if not pending_left:
        lifecycle.finish_campaign(campaign_id, pending_checked=True)
    log.info("message %s", outcome.status, extra=extra)
    return outcome.status


def _record_window() -> float:
    """How long to keep trying to record an attempt through a database outage: `RECORD_RETRY_WINDOW`, and
    never more than half of the job's timeout, so that RQ does not stop the job while it records."""
    config = current_app.config
    return min(config["RECORD_RETRY_WINDOW"], config["JOB_TIMEOUT"] / 2)


def _attempt_and_decide(message_id: int, row: dict) -> Outcome:
    """Send the message (unless its customer is gone, or it renders too long) and decide its outcome."""
    retries = row["retry_count"]
    if row["phone"] is None:
        return Outcome(MessageStatus.FAILED, retries, error="the customer no longer exists")
    body = render(row["base_template"], row)
    too_long = over_limit(body, row["channel"])
    if too_long:  # long values made it so: no provider would take it, now or on a retry
        return Outcome(MessageStatus.FAILED, retries, body, f"the rendered message is {too_long}")
    result = _attempt(message_id, row, body)
    if result.ok:
        return Outcome(MessageStatus.SENT, retries, body)
    if _rq_will_retry():
        return Outcome(MessageStatus.PENDING, retries + 1, body, result.error)
    return Outcome(MessageStatus.FAILED, retries, body, result.error)


def _attempt(message_id: int, row: dict, body: str) -> SendResult:
    """One call to the sender; an exception from it (a provider timeout) is a failed attempt."""
    outgoing = OutgoingMessage(
        message_id=message_id,
        campaign_id=row["campaign_id"],
        channel=row["channel"],
        phone=row["phone"],
        body=body,
        attempt=row["retry_count"] + 1,
    )
    try:
        return get_sender(current_app._get_current_object()).send(outgoing)
    except Exception as exc:  # noqa: BLE001 - a provider timeout or crash is a failed attempt like any other
        log.warning("sender raised", extra={"campaign_id": row["campaign_id"], "message_id": message_id}, exc_info=True)
        return SendResult(False, f"sender error: {type(exc).__name__}: {exc}"[:1000])


def fan_out_pending_messages(campaign_id: int, first_id: int | None, last_id: int | None) -> str:
    """Enqueue the send jobs of the campaign's pending messages with ids in the range (all of them when
    the range is open), in keyset batches."""
    count = enqueue_messages(
        pending_messages(campaign_id, first_id, last_id, current_app.config["RECONCILE_BATCH_SIZE"])
    )
    return f"enqueued {count}"


def dispatch_scheduled_campaign(campaign_id: int) -> str:
    """The trigger at a campaign's `scheduled_at`: start it and enqueue its messages."""
    queued = dispatch_due_campaign(campaign_id)
    return "not due, or already dispatched" if queued is None else f"dispatched: {queued} queued"


def periodic_reconcile() -> str:
    """The periodic self-healing pass (see `app.messaging.reconcile`)."""
    report = reconcile()
    return (
        f"dispatched {report.dispatched}, requeued {report.requeued}, finalized {report.finalized}, "
        f"requeued imports {report.requeued_imports}"
    )
