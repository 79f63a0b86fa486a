"""The send job: claim the message, send it, record what came of it.

1. **Claim** (`store.claim`, one statement, committed): queued with this job's `job_seq` -> sending, with
   the worker's name, a lease (`JOB_TIMEOUT` + `LEASE_MARGIN`) and a token naming the claim, if the
   campaign is sending; a paused campaign's message goes back to pending (resume queues it again), a
   canceled one's is canceled. A job that runs twice, or a job from an earlier turn of the message, claims
   nothing: two workers never send one message at once.
2. **Decide before the provider**, in this order: a customer gone or a body over the channel's limit (as
   rendered, its URLs made short links when the campaign tracks them: `_rendered`) fails the message for good;
   a customer who opted out since it was queued cancels it; inside QUIET_HOURS where the recipient is, the
   message waits pending until the window ends (`not_before`; a refill is scheduled for then); under a
   throughput limit the send takes its slot (at most a second away, else the message is queued again and the
   job handed back for later, no retry used), and after a wait longer than `RECHECK_AFTER` reads the
   campaign's status again, so a pause or a cancel stops it.
3. **Send**: one provider call, with no transaction and no pooled connection held.
4. **Record** (`store.record`, naming the claim, committed): taken -> `sent` with the provider's id;
   refused for good -> `failed`; a transient refusal with retries left -> queued again and RQ's Retry
   runs the job later; throttled by the provider -> queued again, the job postponed by its Retry-After;
   an account-level refusal -> pending, and the campaign is paused; an outcome the service cannot know (no
   answer after the request went out) -> `failed` with `error_class` `unknown` (retried only with
   RETRY_UNKNOWN). Then, from the same round trip: a receipt that came before the record is applied, the
   campaign's window is refilled when it ran low, and the campaign ends when nothing is left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import socket
import time
from datetime import timedelta

from flask import current_app
from rq import Retry, get_current_job
from rq.timeouts import JobTimeoutException

from app import clock, metrics
from app.customers import optouts
from app.extensions import db
from app.links import shorten
from app.messaging import fallback, lifecycle, receipts, variants
from app.messaging.providers import OutgoingMessage, Provider, SendResult, WhatsAppTemplate, get_provider
from app.messaging.providers.http import LATE_FOR_SLOT
from app.messaging.segments import segments
from app.messaging.send import quiet_hours, throttle, window
from app.messaging.send.store import (
    Claim,
    Outcome,
    Recorded,
    claim_params,
    open_store,
    record_params,
    record_through_outage,
)
from app.messaging.templates import over_limit, placeholder_values, render, render_values
from app.models import CampaignStatus, Channel, ErrorClass, MessageStatus

log = logging.getLogger(__name__)

# Seconds a claim outlives its job's timeout: past `JOB_TIMEOUT` + this the worker is taken to be dead (or
# hung), and the reconciler puts the message back in line.
LEASE_MARGIN = 15
# The `last_error` of a message canceled because its customer opted out after it was queued.
OPTED_OUT_REASON = "recipient opted out"
# Seconds of waiting for a slot at the provider after which the campaign's status is read again before the
# send: a pause or a cancel stops sends within this, less than a provider's round trip.
RECHECK_AFTER = 0.1
# A throttled message is postponed at most this many times (RQ counts them apart from its retries).
MAX_POSTPONEMENTS = 100
# Seconds to wait when the provider throttles without saying how long: doubled each time, up to the cap.
THROTTLE_BACKOFF = 1
THROTTLE_BACKOFF_CAP = 60
# Who claims: this process, as an operator finds it (`host:pid`).
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"[:100]


class SendAttemptFailed(Exception):
    """Raised after a failed attempt has been recorded, so that RQ schedules the retry."""


def _rq_will_retry() -> bool:
    job = get_current_job()
    return bool(job is not None and job.retries_left)


def send_outbound_message(message_id: int, job_seq: int) -> str | Retry:
    """Claim, send and record one message (see the module's doc); what the job returns: a line for RQ's
    result, or RQ's `Retry` to hand the job back for later. Raises `SendAttemptFailed` after recording a
    failed attempt that RQ retries."""
    config = current_app.config
    now = clock.now()
    claim = Claim(
        worker=WORKER_NAME,
        token=secrets.randbits(62),
        lease_until=now + timedelta(seconds=config["JOB_TIMEOUT"] + LEASE_MARGIN),
    )
    with open_store() as store:
        row = store.claim(claim_params(message_id, job_seq, claim, now))
    if row is None:
        metrics.count_skipped()
        return "skipped: not queued for this job (sent already, or queued again since)"
    if row["status"] != MessageStatus.SENDING:
        metrics.count_message(row["channel"], "held" if row["status"] == MessageStatus.PENDING else "canceled")
        return f"held: campaign {row['campaign_status']}"
    row = variants.for_message(row)  # its variant's templates, when the campaign has variants
    try:
        outcome = _attempt_and_decide(row, message_id, claim)
    except Exception as exc:
        _give_back_after_a_crash(row, message_id, claim, exc)
        raise
    if outcome.body is not None and row["channel"] == Channel.SMS:
        # Stored with the body it counts: the segments billed for it (stats sum the accepted ones).
        outcome = dataclasses.replace(outcome, segments=segments(outcome.body))
    metrics.count_outcome(row["channel"], outcome)
    size = window.window_size(row["priority"])
    params = record_params(message_id, row["campaign_id"], claim, outcome, size, clock.now())
    follow_up = _follow_up(row, outcome)
    recorded = record_through_outage(params, _record_window(), follow_up)
    return _after_record(row, message_id, outcome, recorded, size, follow_up)


def _give_back_after_a_crash(row: dict, message_id: int, claim: Claim, exc: Exception) -> None:
    """The job raised before its provider call (a bug, the database gone): end the claim so that RQ's retry
    of the job claims the message again (queued), or, with no retry left, fail it (a transient failure:
    retry-failed sends it again once the cause is mended). If that record fails too, the claim's lease
    runs out and the reconciler puts the message back in line."""
    retried = _rq_will_retry()
    outcome = Outcome(
        MessageStatus.QUEUED if retried else MessageStatus.FAILED,
        row["retry_count"] + (1 if retried else 0),
        error=f"the send job raised {type(exc).__name__}: {exc}"[:1000],
        error_code="crash",
        error_class=ErrorClass.TRANSIENT,
    )
    size = window.window_size(row["priority"])
    try:
        record_through_outage(record_params(message_id, row["campaign_id"], claim, outcome, size, clock.now()), 0)
    except Exception:  # noqa: BLE001 - the lease covers it; the job's own error is what RQ records
        log.warning("could not give back a claim after the send job raised", extra={"message_id": message_id})


def _follow_up(row: dict, outcome: Outcome) -> dict:
    """What a send does after its record, named in data: kept with the record when it waits in Redis."""
    return {
        "channel": row["channel"],
        "customer_id": row["customer_id"],
        "recipient_opted_out": outcome.recipient_opted_out,
        "account_refused": outcome.error_class == ErrorClass.ACCOUNT and outcome.status == MessageStatus.PENDING,
        "error": outcome.error,
        # What the failure triggers: the message's SMS fallback (`undeliverable`, `window_closed`), or None.
        "fallback": fallback.reason_for(row, outcome.status, outcome.error_code),
    }


def _after_record(
    row: dict, message_id: int, outcome: Outcome, recorded: Recorded, size: int, follow_up: dict
) -> str | Retry:
    """What is left once the outcome is recorded (see `_follow_through`); then what the job returns (see
    `send_outbound_message`). A record that waits in Redis (the database unavailable) is followed through
    when it is applied."""
    campaign_id = row["campaign_id"]
    extra = {"campaign_id": campaign_id, "message_id": message_id, "status": outcome.status}
    if not recorded.deferred:
        _follow_through(campaign_id, message_id, recorded, size, follow_up, outcome)
        if outcome.status == MessageStatus.SENT and row["sms_fallback"] and row["channel"] == Channel.WHATSAPP:
            fallback.schedule_check(campaign_id, clock.now(), row["sms_fallback"])
    if outcome.not_before is not None:
        window.schedule_refill(campaign_id, outcome.not_before)
        log.info(
            "quiet hours where the recipient is; the message waits",
            extra={**extra, "not_before": outcome.not_before.isoformat()},
        )
        return f"held until {outcome.not_before.isoformat()}"
    if outcome.hand_back is not None:
        delay = max(1, math.ceil(outcome.hand_back))
        return Retry(max=MAX_POSTPONEMENTS, interval=delay)
    if outcome.status == MessageStatus.QUEUED:
        log.info("send attempt failed; RQ will retry", extra={**extra, "error": outcome.error})
        raise SendAttemptFailed(f"message {message_id}: {outcome.error}")
    if follow_up["account_refused"]:
        return "held: account refused, campaign paused"
    if outcome.status == MessageStatus.PENDING:
        return "held: campaign paused or canceled while it waited for its slot"
    if recorded.deferred:
        return f"{outcome.status}: its record waits in Redis for the database"
    log.info("message %s", outcome.status, extra=extra)
    return outcome.status


def _follow_through(
    campaign_id: int, message_id: int, recorded: Recorded, size: int, follow_up: dict, outcome: Outcome | None = None
) -> None:
    """What a send does once its record is in: say so if its claim was lost meanwhile, apply a receipt that
    came first, an opt-out at the provider, a pause for an account the provider refused, and look after
    the campaign's window and its end."""
    extra = {"campaign_id": campaign_id, "message_id": message_id}
    if not recorded.recorded:
        # Its lease passed while it sent (the worker hung past its job's timeout): the message went back
        # in line, and may be sent again. Say so; the outcome stays in this line only.
        log.warning("the claim was lost before its record", extra={**extra, "error": follow_up["error"]})
        metrics.count_message(follow_up["channel"], "claim_lost")
    if recorded.receipt_waiting and outcome is not None:
        receipts.apply_waiting(outcome.provider, outcome.provider_message_id)
    if follow_up["recipient_opted_out"]:
        optouts.opt_out_at_provider(follow_up["customer_id"], follow_up["channel"], message_id)
        db.session.commit()
    if follow_up.get("fallback") and recorded.recorded:
        fallback.trigger(message_id, follow_up["fallback"])
    if follow_up["account_refused"]:
        reason = f"paused: the provider refused the account: {follow_up['error']}"
        if lifecycle.pause_for_account(campaign_id, reason):
            log.warning("provider refused the account; campaign paused", extra={**extra, "error": follow_up["error"]})
    if window.should_refill(recorded.in_window, size, recorded.pending):
        window.refill(campaign_id)
    elif not recorded.in_window and not recorded.pending:
        lifecycle.finish_campaign(campaign_id, checked=True)


def apply_kept_outcome(params: dict, follow_up: dict) -> None:
    """Apply a send's record that waited in Redis while the database was unavailable (`spool`), and follow it
    through as its send would have. Raises what the database raises (it stays in Redis)."""
    with open_store() as store:
        recorded = store.record(params)
    if recorded.receipt_waiting:
        receipts.apply_waiting(params["provider"], params["provider_message_id"])
    follow_up = {
        "channel": "",
        "customer_id": None,
        "recipient_opted_out": False,
        "account_refused": False,
        "error": params.get("error"),
        "fallback": None,
        **follow_up,
    }
    _follow_through(params["campaign_id"], params["message_id"], recorded, params["cap"], follow_up)


def _postpone_delay(retry_after: float | None) -> float:
    if retry_after is not None:
        return max(1.0, retry_after)
    job = get_current_job()
    postponed = (job.number_of_retries or 0) if job is not None else 0
    return min(THROTTLE_BACKOFF * 2**postponed, THROTTLE_BACKOFF_CAP)


def _record_window() -> float:
    """How long to keep trying to record an attempt through a database outage: `RECORD_RETRY_WINDOW`, and
    never more than half of the job's timeout, so that RQ does not stop the job while it records."""
    config = current_app.config
    return min(config["RECORD_RETRY_WINDOW"], config["JOB_TIMEOUT"] / 2)


def _attempt_and_decide(row: dict, message_id: int, claim: Claim) -> Outcome:
    """What the claim ends in: decided before the provider (see the module's doc, step 2), or by its answer."""
    retries = row["retry_count"]
    if row["phone"] is None:
        gone = {"error_code": "customer_gone", "error_class": ErrorClass.PERMANENT}
        return Outcome(MessageStatus.FAILED, retries, error="the customer no longer exists", **gone)
    if row["opted_out"]:  # since it was queued: never sent
        return Outcome(MessageStatus.CANCELED, retries, error=OPTED_OUT_REASON, error_code="opted_out")
    if row["replaced_delivered"]:  # a fallback whose WhatsApp message was delivered after all
        return Outcome(MessageStatus.CANCELED, retries, error=fallback.DELIVERED_FIRST, error_code="delivered_first")
    body, parameters, links = _rendered(row, message_id)
    too_long = over_limit(body, row["channel"])
    if too_long:  # long values made it so: no provider would take it, now or on a retry
        error = f"the rendered message is {too_long}"
        return Outcome(MessageStatus.FAILED, retries, body, error, "too_long", ErrorClass.PERMANENT, links=links)
    if row["respect_quiet_hours"]:  # before the throughput slot: a held message takes none
        config = current_app.config
        until = quiet_hours.quiet_until(row["phone"], clock.now(), config["QUIET_HOURS"], config["DEFAULT_TIMEZONE"])
        if until is not None:
            metrics.count_message(row["channel"], "quiet_hours")
            return Outcome(MessageStatus.PENDING, retries, not_before=until)
    app = current_app._get_current_object()
    provider = get_provider(app, row["channel"])
    checked = time.monotonic()
    for _ in range(throttle.LATE_TRIES):
        # The slot comes last, so that nothing slow (building the provider) separates it from the request.
        later = throttle.wait_for_slot(app, row["channel"])
        if later is not None:
            log.debug("no slot at the provider yet; trying again later", extra={"message_id": message_id})
            metrics.count_message(row["channel"], "limited")
            return Outcome(MessageStatus.QUEUED, retries, hand_back=later)
        if time.monotonic() - checked > RECHECK_AFTER:  # a pause may have come while it waited for its slot
            with open_store() as store:
                status = store.campaign_status(row["campaign_id"])
            if status != CampaignStatus.SENDING:
                stopped = MessageStatus.CANCELED if status == CampaignStatus.CANCELED else MessageStatus.PENDING
                return Outcome(stopped, retries)
            checked = time.monotonic()
        result = _attempt(provider, message_id, row, body, parameters)
        if result.error_code != LATE_FOR_SLOT:
            break
    else:  # late for every slot it took: the worker is overloaded; back to the queue
        metrics.count_message(row["channel"], "limited")
        return Outcome(MessageStatus.QUEUED, retries, hand_back=1)
    return dataclasses.replace(_decide(result, provider, retries, body), links=links)


def _rendered(row: dict, message_id: int) -> tuple[str, list[str] | None, list[str] | None]:
    """The message's body, its WhatsApp template's body parameters (None without a template), and the
    original URLs of its short links (None when its campaign tracks none, or it has none). With
    `track_links` every http(s) URL becomes the message's own short link (app.links); in a WhatsApp
    template only the parameters' URLs can be (the template's own text is Meta's), and the body is rendered
    from the shortened parameters, so that it says what was sent."""
    template = row.get("whatsapp_template") if row["channel"] == Channel.WHATSAPP else None
    parameters = placeholder_values(row["base_template"], row) if template else None
    if not row["track_links"]:
        return render(row["base_template"], row), parameters, None
    shortener = shorten.for_message(current_app._get_current_object(), message_id)
    if parameters is None:
        body = shortener.shorten(render(row["base_template"], row))
    else:
        parameters = [shortener.shorten(value) for value in parameters]
        body = render_values(row["base_template"], parameters)
    return body, parameters, shortener.links or None


def _decide(result: SendResult, provider: Provider, retries: int, body: str) -> Outcome:
    """The outcome of the provider's answer `result` for a message that has used `retries` retries."""
    if result.ok:
        return Outcome(
            MessageStatus.SENT, retries, body, provider=provider.name, provider_message_id=result.provider_message_id
        )
    refused = {"error": result.error, "error_code": result.error_code, "error_class": result.error_class}
    if result.recipient_opted_out:
        return Outcome(MessageStatus.FAILED, retries, body, **refused, recipient_opted_out=True)
    if result.error_class == ErrorClass.THROTTLED:
        # Queued again with the retries it had; the job postpones itself.
        return Outcome(MessageStatus.QUEUED, retries, body, **refused, hand_back=_postpone_delay(result.retry_after))
    if result.error_class == ErrorClass.ACCOUNT:
        # Every message of the campaign would be refused the same way until a person acts: back in line with
        # the retries it had, and the job pauses the campaign instead of burning them.
        return Outcome(MessageStatus.PENDING, retries, body, **refused)
    retried = result.error_class == ErrorClass.TRANSIENT or (
        result.error_class == ErrorClass.UNKNOWN and current_app.config["RETRY_UNKNOWN"]
    )
    if retried and _rq_will_retry():
        return Outcome(MessageStatus.QUEUED, retries + 1, body, **refused)
    return Outcome(MessageStatus.FAILED, retries, body, **refused)


def _attempt(provider: Provider, message_id: int, row: dict, body: str, parameters: list[str] | None) -> SendResult:
    """One call to the provider; an exception from it (a bug) is a transient failure like any other."""
    template = row.get("whatsapp_template") if parameters is not None else None
    outgoing = OutgoingMessage(
        message_id=message_id,
        campaign_id=row["campaign_id"],
        channel=row["channel"],
        phone=row["phone"],
        body=body,
        attempt=row["retry_count"] + 1,
        template=WhatsAppTemplate(template["name"], template["language"], parameters) if template else None,
    )
    try:
        with metrics.provider_call(provider.name):
            return provider.send(outgoing)
    except JobTimeoutException:
        # RQ's job timeout stopped the call: the request may have gone out, and no answer was read.
        return SendResult.refused(ErrorClass.UNKNOWN, "the job's timeout stopped the provider call", "job_timeout")
    except Exception as exc:  # noqa: BLE001 - a provider's crash is a failed attempt like any other
        log.warning(
            "provider raised", extra={"campaign_id": row["campaign_id"], "message_id": message_id}, exc_info=True
        )
        return SendResult.refused(ErrorClass.TRANSIENT, f"sender error: {type(exc).__name__}: {exc}", "exception")
