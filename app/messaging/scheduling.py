"""Triggers kept in rq-scheduler: a campaign's dispatch at its `scheduled_at`, and the periodic jobs.

Redis may lose these; the reconciler finds due campaigns in PostgreSQL all the same.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import current_app
from rq_scheduler import Scheduler

from app.extensions import get_control_queue, get_redis

log = logging.getLogger(__name__)

DISPATCH_JOB = "app.messaging.jobs.dispatch_campaign"


def dispatch_job_id(campaign_id: int) -> str:
    return f"dispatch_campaign-{campaign_id}"


def get_scheduler() -> Scheduler:
    return Scheduler(
        queue=get_control_queue(), connection=get_redis(), interval=current_app.config["SCHEDULER_INTERVAL"]
    )


def schedule_dispatch(campaign_id: int, at: datetime) -> None:
    """(Re)place the campaign's dispatch trigger at `at`. One trigger per campaign: its id is derived
    from the campaign, so rescheduling moves it instead of adding a second."""
    # rq-scheduler keeps whole seconds and fires when the second is reached: round up, never early.
    if at.microsecond:
        at = at.replace(microsecond=0) + timedelta(seconds=1)
    get_scheduler().enqueue_at(
        at, DISPATCH_JOB, campaign_id, job_id=dispatch_job_id(campaign_id), job_result_ttl=0, timeout=3600
    )


def cancel_dispatch(campaign_id: int) -> None:
    get_scheduler().cancel(dispatch_job_id(campaign_id))


def sync_dispatch(campaign_id: int, at: datetime | None) -> None:
    """After a commit: make Redis's trigger match the campaign's `scheduled_at` (None cancels). If Redis
    is unreachable the reconciler dispatches the campaign when it is due, so this only logs."""
    try:
        if at is None:
            cancel_dispatch(campaign_id)
        else:
            schedule_dispatch(campaign_id, at)
    except Exception:  # noqa: BLE001 - the database already holds the truth
        log.warning("could not update the dispatch trigger", extra={"campaign_id": campaign_id}, exc_info=True)


RECONCILE_JOB = "app.messaging.jobs.reconcile"
RECONCILE_JOB_ID = "periodic-reconcile"


def register_periodic_jobs(scheduler: Scheduler) -> None:
    """Register the reconciler to run every `RECONCILE_INTERVAL` seconds. Its id is fixed, so
    registering again (every scheduler start) replaces it instead of adding a second."""
    from app import clock

    scheduler.cancel(RECONCILE_JOB_ID)
    scheduler.schedule(
        scheduled_time=clock.now(),
        func=RECONCILE_JOB,
        interval=current_app.config["RECONCILE_INTERVAL"],
        repeat=None,
        id=RECONCILE_JOB_ID,
        result_ttl=600,
        timeout=3600,
    )
