"""What RQ runs. Jobs take ids, load what they need, and are safe to run twice."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from flask import current_app
from rq import Retry, get_current_job

from app import clock, metrics
from app.customers import optouts
from app.extensions import db
from app.messaging import lifecycle, receipts
from app.messaging.providers import OutgoingMessage, Provider, SendResult, WhatsAppTemplate, get_provider
from app.messaging.providers.http import LATE_FOR_SLOT
from app.messaging.reconcile import reconcile
from app.messaging.segments import segments
from app.messaging.send import quiet_hours, throttle
from app.messaging.send.enqueue import enqueue_messages, pending_messages
from app.messaging.send.store import MessageStore, Outcome, open_store, record_through_outage
from app.messaging.templates import over_limit, placeholder_values, render
from app.messaging.triggers import dispatch_due_campaign
from app.models import CampaignStatus, Channel, ErrorClass, MessageStatus, OptOutSource

log = logging.getLogger(__name__)


class SendAttemptFailed(Exception):
    """Raised after a failed attempt has been recorded, so that RQ schedules the retry."""


def _rq_will_retry() -> bool:
    job = get_current_job()
    return bool(job is not None and job.retries_left)


def send_outbound_message(message_id: int) -> str | Retry:
    """Render and send one pending message through its channel's provider, record the outcome and commit.

    A message that is not pending (already sent, or failed for good) is left alone, and a message whose
    row another worker holds is skipped: a job that runs twice never sends twice. What the provider says
    decides the rest (docs/providers.md): taken, the message is `sent` with the provider's id; refused
    for good (`permanent`), `failed` at once; a `transient` refusal is retried by RQ's Retry, the last one
    failing the message; a `throttled` one is tried again after the provider's Retry-After, without using
    a retry (the job returns RQ's `Retry` to postpone itself); an `account` one (balance, credentials,
    sender id, template) would refuse every other message too: the message stays pending with the retries
    it had, the campaign is paused with the provider's words in `status_reason`, and the job ends without
    a retry. A job whose campaign is not `sending` (paused) sends nothing and records nothing: the
    message stays pending, and the job ends (resume queues it again). A message whose customer has opted
    out of the channel since it was queued is `canceled` ("recipient opted out") without a provider call;
    a provider's refusal saying the recipient opted out with it (Twilio 21610) fails the message for good
    and opts the customer out (source `provider`). Under a throughput limit the send
    first takes its slot at the provider (`app.messaging.send.throttle`): a slot more than a second away hands
    the job back for later, the message untouched and no retry used; after a wait of more than
    `RECHECK_AFTER` the campaign's status is read again; a send held up past its slot takes a new one.
    Inside QUIET_HOURS in the recipient's time zone (a campaign that respects them), checked beside the
    pause, nothing is sent: the message records when it may go (`not_before`), stays pending with its
    retries, and the job hands itself back to run then.
    Database work: a locked read, then the update, its commit and the completion check (two round trips
    on PostgreSQL, see `message_store`). If the database becomes unavailable after the attempt, the
    record is retried for `RECORD_RETRY_WINDOW` seconds: only a longer outage leaves the message pending,
    to be sent again.
    """
    with open_store() as store:
        row = store.load(message_id)
        if row is None:
            return "skipped: missing, or being sent by another worker"
        campaign_id = row["campaign_id"]
        outcome = _attempt_and_decide(store, message_id, row) if row["status"] == MessageStatus.PENDING else None
        metrics.count_send(row, outcome)
        if isinstance(outcome, Retry):  # no slot at the provider soon: handed back, the message untouched
            return outcome
        if outcome is not None and outcome.body is not None and row["channel"] == Channel.SMS:
            # Stored with the body it counts: the segments billed for it (stats sum the accepted ones).
            outcome = dataclasses.replace(outcome, segments=segments(outcome.body))
        if outcome is not None and not outcome.held:
            recorded = record_through_outage(store, message_id, campaign_id, outcome, _record_window())
    if outcome is None:
        lifecycle.finish_campaign(campaign_id)  # the run that recorded it may have died before this step
        return f"skipped: already {row['status']}"
    if outcome.held:
        # No retry, no re-queue: resuming the campaign queues its pending messages again.
        return f"held: campaign {row['campaign_status']}"
    if recorded.receipt_waiting:
        receipts.apply_waiting(outcome.provider, outcome.provider_message_id)
    if outcome.recipient_opted_out:
        _opt_out_at_provider(row, message_id)
    extra = {"campaign_id": campaign_id, "message_id": message_id, "status": outcome.status}
    if outcome.error_class == ErrorClass.THROTTLED:
        delay = _postpone_delay(outcome)
        log.info("provider asked to slow down; trying again later", extra={**extra, "delay": delay})
        return Retry(max=MAX_POSTPONEMENTS, interval=delay)
    if outcome.error_class == ErrorClass.ACCOUNT and outcome.status == MessageStatus.PENDING:
        reason = f"paused: the provider refused the account: {outcome.error}"
        if lifecycle.pause_for_account(campaign_id, reason):
            log.warning("provider refused the account; campaign paused", extra={**extra, "error": outcome.error})
        return "held: account refused, campaign paused"
    if outcome.status == MessageStatus.PENDING:
        log.info("send attempt failed; RQ will retry", extra={**extra, "error": outcome.error})
        raise SendAttemptFailed(f"message {message_id}: {outcome.error}")
    if not recorded.pending_left:
        lifecycle.finish_campaign(campaign_id, pending_checked=True)
    log.info("message %s", outcome.status, extra=extra)
    return outcome.status


# The `last_error` of a message canceled because its customer opted out after it was queued.
OPTED_OUT_REASON = "recipient opted out"
# Seconds of waiting for a slot at the provider after which the campaign's status is read again before the
# send (a pause must stop sends within a second; the wait may be up to `throttle.MAX_WAIT` a slot).
RECHECK_AFTER = 0.25
# A throttled message is postponed at most this many times (RQ counts them apart from its retries).
MAX_POSTPONEMENTS = 100
# Seconds to wait when the provider throttles without saying how long: doubled each time, up to the cap.
THROTTLE_BACKOFF = 1
THROTTLE_BACKOFF_CAP = 60


def _postpone_delay(outcome: Outcome) -> int:
    if outcome.retry_after is not None:
        return max(1, math.ceil(outcome.retry_after))
    job = get_current_job()
    postponed = (job.number_of_retries or 0) if job is not None else 0
    return min(THROTTLE_BACKOFF * 2**postponed, THROTTLE_BACKOFF_CAP)


def _opt_out_at_provider(row: dict, message_id: int) -> None:
    """The provider refused the message because its recipient opted out with it: record the opt-out here
    too (source `provider`), so that later sends leave them out before reaching the provider."""
    changed = optouts.opt_out_ids([row["customer_id"]], row["channel"], OptOutSource.PROVIDER)
    db.session.commit()
    log.info(
        "the provider says the recipient opted out; customer opted out",
        extra={
            "message_id": message_id,
            "customer_id": row["customer_id"],
            "channel": row["channel"],
            "changed": bool(changed),
        },
    )


def _record_window() -> float:
    """How long to keep trying to record an attempt through a database outage: `RECORD_RETRY_WINDOW`, and
    never more than half of the job's timeout, so that RQ does not stop the job while it records."""
    config = current_app.config
    return min(config["RECORD_RETRY_WINDOW"], config["JOB_TIMEOUT"] / 2)


def _attempt_and_decide(store: MessageStore, message_id: int, row: dict) -> Outcome | Retry:
    """Send the message and decide its outcome. Before the provider, in this order: a customer gone or a
    body too long fails it, an opt-out cancels it, a campaign not `sending` holds it, quiet hours where the
    recipient is hold it until they end, and the throughput limit may hand the job back for later; those
    two hand-backs are the `Retry` returned, using none of the message's retries."""
    retries = row["retry_count"]
    if row["phone"] is None:
        gone = {"error_code": "customer_gone", "error_class": ErrorClass.PERMANENT}
        return Outcome(MessageStatus.FAILED, retries, error="the customer no longer exists", **gone)
    if row["opted_out"]:  # since it was queued: never sent, whatever the campaign's status
        return Outcome(MessageStatus.CANCELED, retries, error=OPTED_OUT_REASON, error_code="opted_out")
    body = render(row["base_template"], row)
    too_long = over_limit(body, row["channel"])
    if too_long:  # long values made it so: no provider would take it, now or on a retry
        error = f"the rendered message is {too_long}"
        return Outcome(MessageStatus.FAILED, retries, body, error, "too_long", ErrorClass.PERMANENT)
    if row["campaign_status"] != CampaignStatus.SENDING:  # paused: as late as possible before the provider
        return Outcome(MessageStatus.PENDING, retries, held=True)
    if row["respect_quiet_hours"]:  # also before the throughput slot: a held message takes none
        later = _quiet_hours_hold(store, message_id, row)
        if later is not None:
            return later
    app = current_app._get_current_object()
    provider = get_provider(app, row["channel"])
    checked = time.monotonic()
    for _ in range(throttle.LATE_TRIES):
        # The slot comes last, so that nothing slow (building the provider) separates it from the request.
        later = throttle.wait_for_slot(app, row["channel"])
        if later is not None:
            extra = {"campaign_id": row["campaign_id"], "message_id": message_id, "delay": later}
            log.info("no slot at the provider yet; trying again later", extra=extra)
            metrics.count_message(row["channel"], "limited")
            return Retry(max=MAX_POSTPONEMENTS, interval=max(1, math.ceil(later)))
        if time.monotonic() - checked > RECHECK_AFTER:  # a pause may have come while it waited for its slot
            row["campaign_status"] = store.campaign_status(row["campaign_id"])
            if row["campaign_status"] != CampaignStatus.SENDING:
                return Outcome(MessageStatus.PENDING, retries, held=True)
            checked = time.monotonic()
        result = _attempt(provider, message_id, row, body)
        if result.error_code != LATE_FOR_SLOT:
            break
    else:  # late for every slot it took: the worker is overloaded; back to the queue
        metrics.count_message(row["channel"], "limited")
        return Retry(max=MAX_POSTPONEMENTS, interval=1)
    if result.ok:
        return Outcome(
            MessageStatus.SENT, retries, body, provider=provider.name, provider_message_id=result.provider_message_id
        )
    refused = {"error": result.error, "error_code": result.error_code, "error_class": result.error_class}
    if result.recipient_opted_out:
        return Outcome(MessageStatus.FAILED, retries, body, **refused, recipient_opted_out=True)
    if result.error_class == ErrorClass.THROTTLED:
        # Stays pending with the retries it had; the job postpones itself.
        return Outcome(MessageStatus.PENDING, retries, body, **refused, retry_after=result.retry_after)
    if result.error_class == ErrorClass.ACCOUNT:
        # Every message of the campaign would be refused the same way until a person acts: stays pending
        # with the retries it had, and the job pauses the campaign instead of burning them.
        return Outcome(MessageStatus.PENDING, retries, body, **refused)
    if result.error_class != ErrorClass.PERMANENT and _rq_will_retry():
        return Outcome(MessageStatus.PENDING, retries + 1, body, **refused)
    return Outcome(MessageStatus.FAILED, retries, body, **refused)


def _quiet_hours_hold(store: MessageStore, message_id: int, row: dict) -> Retry | None:
    """Inside QUIET_HOURS where the recipient is: record on the message when it may go (`not_before`, the
    window's end; it stays pending with the retries it had) and return the `Retry` that runs the job again
    then. None outside the window.

    The job hands itself back rather than enqueue a new job at that time: RQ moves a job that returns
    `Retry` into its scheduled registry in the same step that ends this run, under the same id, so the
    wait is one entry in a sorted set (no busy loop, however long the night) and nothing this run writes
    afterwards can overwrite it, as the end of this run would overwrite a job of the same id enqueued from
    inside it. These hand-backs count toward `MAX_POSTPONEMENTS` with the throttled ones: one a night."""
    config = current_app.config
    now = clock.now()
    until = quiet_hours.quiet_until(row["phone"], now, config["QUIET_HOURS"], config["DEFAULT_TIMEZONE"])
    if until is None:
        return None
    store.hold(message_id, until)
    metrics.count_message(row["channel"], "quiet_hours")
    delay = max(1, math.ceil((until - now).total_seconds()))
    extra = {"campaign_id": row["campaign_id"], "message_id": message_id, "not_before": until.isoformat()}
    log.info("quiet hours where the recipient is; the message waits", extra={**extra, "delay": delay})
    return Retry(max=MAX_POSTPONEMENTS, interval=delay)


def _attempt(provider: Provider, message_id: int, row: dict, body: str) -> SendResult:
    """One call to the provider; an exception from it (a bug) is a transient failure like any other."""
    template = row.get("whatsapp_template") if row["channel"] == Channel.WHATSAPP else None
    outgoing = OutgoingMessage(
        message_id=message_id,
        campaign_id=row["campaign_id"],
        channel=row["channel"],
        phone=row["phone"],
        body=body,
        attempt=row["retry_count"] + 1,
        template=WhatsAppTemplate(template["name"], template["language"], placeholder_values(row["base_template"], row))
        if template
        else None,
    )
    try:
        with metrics.provider_call(provider.name):
            return provider.send(outgoing)
    except Exception as exc:  # noqa: BLE001 - a provider's crash is a failed attempt like any other
        log.warning(
            "provider raised", extra={"campaign_id": row["campaign_id"], "message_id": message_id}, exc_info=True
        )
        return SendResult.refused(ErrorClass.TRANSIENT, f"sender error: {type(exc).__name__}: {exc}", "exception")


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
