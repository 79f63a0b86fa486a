"""Scheduled campaigns and periodic jobs: the dispatch of a campaign at its `scheduled_at` (and its
trigger kept in rq-scheduler), and the periodic jobs, declared here as data.

Redis may lose these: the scheduler process puts the periodic jobs back within one pass of its loop,
and the reconciler finds due campaigns in PostgreSQL all the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from rq.job import Job
from rq_scheduler import Scheduler

from app.audiences import segments
from app.messaging import lifecycle
from app.messaging.send import window
from app.queues import get_control_queue, get_redis

log = logging.getLogger(__name__)

DISPATCH_JOB = "app.messaging.jobs.dispatch_scheduled_campaign"


def dispatch_due_campaign(campaign_id: int, now: datetime | None = None) -> int | None:
    """Start a due scheduled campaign and queue its first window; one with no messages ends `failed` at
    once. Idempotent: returns how many jobs were queued, or None when it was not due or was already
    dispatched. A segment a send named while it was scheduled is evaluated now, as it fires."""
    if not lifecycle.start_due_campaign(campaign_id, now, then=segments.add_waiting_segment):
        return None
    queued = window.refill(campaign_id).queued
    if not queued:
        lifecycle.finish_campaign(campaign_id)
    return queued


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


PERIODIC_PREFIX = "periodic-"


@dataclass(frozen=True)
class PeriodicJob:
    """A job rq-scheduler runs every `interval_setting` seconds (a setting's name, read from the app's config)."""

    func: str
    interval_setting: str
    timeout: int = 3600

    def interval(self) -> int:
        return int(current_app.config[self.interval_setting])

    def job_id(self) -> str:
        """Derived from the definition: registering it again replaces it, and a changed interval gets a
        new id (the old job is removed as obsolete by `register_periodic_jobs`)."""
        return f"{PERIODIC_PREFIX}{self.func.replace('.', '_')}-every-{self.interval()}s"


# Everything periodic. The scheduler process registers these when it starts and puts back any that
# Redis lost on each pass of its loop (app.messaging.scheduler), so a flush delays them by one
# SCHEDULER_INTERVAL at most.
PERIODIC_JOBS = [
    PeriodicJob("app.messaging.jobs.periodic_reconcile", "RECONCILE_INTERVAL"),
    PeriodicJob("app.idempotency.purge_expired", "IDEMPOTENCY_PURGE_INTERVAL"),
]


def _register(scheduler: Scheduler, job: PeriodicJob) -> None:
    """(Re)place `job`, due at once: a job missing from Redis may be long overdue."""
    from app import clock

    scheduler.cancel(job.job_id())
    scheduler.schedule(
        scheduled_time=clock.now(),
        func=job.func,
        interval=job.interval(),
        repeat=None,
        id=job.job_id(),
        # rq-scheduler drops a scheduled job whose hash has expired: keep it from one run to the next.
        result_ttl=job.interval() + 600,
        timeout=job.timeout,
    )


def register_periodic_jobs(scheduler: Scheduler, jobs: list[PeriodicJob] = PERIODIC_JOBS) -> None:
    """Register every periodic job, due at once, and remove periodic jobs no longer declared (an old
    interval). Registering twice keeps one of each: their ids are fixed by their definitions."""
    wanted = {job.job_id() for job in jobs}
    for member in scheduler.connection.zscan_iter(scheduler.scheduled_jobs_key, match=PERIODIC_PREFIX + "*"):
        job_id = member[0].decode()
        if job_id not in wanted:
            scheduler.cancel(job_id)
    for job in jobs:
        _register(scheduler, job)


def missing_periodic_jobs(scheduler: Scheduler, jobs: list[PeriodicJob] = PERIODIC_JOBS) -> list[PeriodicJob]:
    """The periodic jobs Redis no longer holds (a flush, a restart without persistence): not in the
    schedule, or in it without their job hash. One round trip."""
    with scheduler.connection.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.zscore(scheduler.scheduled_jobs_key, job.job_id())
            pipe.exists(Job.key_for(job.job_id()))
        found = pipe.execute()
    return [
        job for job, score, exists in zip(jobs, found[::2], found[1::2], strict=True) if score is None or not exists
    ]


def restore_periodic_jobs(scheduler: Scheduler, jobs: list[PeriodicJob] = PERIODIC_JOBS) -> list[PeriodicJob]:
    """Register again, due at once, the periodic jobs Redis lost; returns them."""
    missing = missing_periodic_jobs(scheduler, jobs)
    for job in missing:
        _register(scheduler, job)
    return missing
