"""What RQ runs: the functions jobs name (their import paths are stored in Redis with each job, so they
stay here whatever moves behind them). Jobs take ids, load what they need, and are safe to run twice."""

from __future__ import annotations

from rq import Retry

from app.messaging import fallback, lifecycle, recipient_batches, reconcile
from app.messaging.send import job, window
from app.messaging.triggers import dispatch_due_campaign


def send_outbound_message(message_id: int, job_seq: int | None = None) -> str | Retry:
    """Claim, send and record one message of a campaign's window (`app.messaging.send.job`). A job queued
    before windows existed names no `job_seq`: it does nothing, and its message is queued again by the
    reconciler."""
    if job_seq is None:
        return "skipped: a job from before send windows; the reconciler queues its message again"
    return job.send_outbound_message(message_id, job_seq)


def refill_window(campaign_id: int) -> str:
    """Top a sending campaign's window up (scheduled for when messages held by quiet hours may go)."""
    return f"queued {window.refill(campaign_id).queued}"


def fan_out_pending_messages(campaign_id: int, first_id: int | None = None, last_id: int | None = None) -> str:
    """A fan-out job from before send windows: a refill of the campaign's window now does its work."""
    return refill_window(campaign_id)


def cancel_waiting_messages(campaign_id: int) -> str:
    """Cancel what a canceled campaign still has waiting, batch by batch (what its cancel left)."""
    return f"canceled {lifecycle.cancel_all_waiting(campaign_id)}"


def add_recipients(campaign_id: int) -> str:
    """Add the rest of a send's audience, batch by batch (`app.messaging.recipient_batches`)."""
    return f"added {recipient_batches.add_rest(campaign_id)}"


def check_fallbacks(campaign_id: int) -> str:
    """Create the campaign's SMS fallbacks whose not-delivered window has passed (`app.messaging.fallback`),
    then end the campaign if nothing is left."""
    created = fallback.check(campaign_id)
    return f"created {created} fallbacks; {lifecycle.finish_campaign(campaign_id) or 'not finished'}"


def dispatch_scheduled_campaign(campaign_id: int) -> str:
    """The trigger at a campaign's `scheduled_at`: start it and queue its first window."""
    queued = dispatch_due_campaign(campaign_id)
    return "not due, or already dispatched" if queued is None else f"dispatched: {queued} queued"


def periodic_reconcile() -> str:
    """The periodic self-healing pass (see `app.messaging.reconcile`)."""
    return reconcile.reconcile().summary()
