"""The RQ worker class the `worker` process runs.

`SimpleWorker` runs jobs in the worker process instead of forking a work horse per job: measured
here about 3x the jobs per second of the forking `Worker` (see README, "Worker"). A job that raises
is caught and recorded by RQ and the worker goes on; a job that hangs is stopped by RQ's timeout.

Around a job that takes about a millisecond, RQ's own bookkeeping is most of a worker's time: about
twenty Redis round trips a job, nine of them heartbeats (three commands sent one by one, three times
a job) and two the worker's state written twice in a row. `AppWorker` sends a heartbeat's commands in
one round trip, drops a heartbeat that would not move the worker key's expiry by more than a second,
does not write a state the worker is already in, and looks for `rq suspend` once a second rather than
before every job. Its key's TTL follows `JOB_TIMEOUT`, so that the TTL a job's own heartbeat gives
the key is the one the worker's heartbeat would give it back after the job. What RQ stores stays as
RQ stores it: `rq info` and the dashboards see the same workers, states and jobs.
"""

from __future__ import annotations

import contextlib
import logging
import time

from flask import Flask
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.job import Job

from app.extensions import db
from app.logs import worker_job_id
from app.messaging.dispatch import SEND_JOB

log = logging.getLogger(__name__)

# A heartbeat is skipped when the worker key would expire at most this many seconds later than it
# already does.
HEARTBEAT_SLACK = 1.0
# How often the worker looks for `rq suspend`.
SUSPENSION_CHECK_INTERVAL = 1.0


class AppWorker(SimpleWorker):
    """A `SimpleWorker` that runs each job inside an app context of an app built once per process,
    returns the job's database connection to the pool afterwards, and spends fewer Redis round
    trips on its own bookkeeping (see the module's doc)."""

    app: Flask
    stop_requested: bool = False  # a SIGTERM or SIGINT asked this worker to stop
    _key_expires_at: float = 0.0  # monotonic time at which the last heartbeat lets the worker key expire
    _suspension_checked_at: float = float("-inf")

    def request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        if job.func_name == SEND_JOB and job.retries_left:
            # One meaning for RETRY_INTERVALS: the worker that runs a failed attempt decides the delay
            # before the next, whichever process enqueued the job.
            job.retry_intervals = self.app.config["RETRY_INTERVALS"]
        token = worker_job_id.set(job.id)
        with self.app.app_context():
            try:
                super().execute_job(job, queue)
            finally:
                _release_session()
                worker_job_id.reset(token)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        ttl = timeout or self.worker_ttl + 60
        expires_at = time.monotonic() + ttl
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)  # part of a round trip RQ makes anyway
        elif expires_at - self._key_expires_at <= HEARTBEAT_SLACK:
            return
        else:
            with self.connection.pipeline(transaction=False) as batch:
                super().heartbeat(timeout, batch)
                batch.execute()
        # EXPIRE replaces the key's expiry, even with a shorter one (a job's own heartbeat TTL).
        self._key_expires_at = expires_at

    def check_for_suspension(self, burst: bool) -> None:
        if time.monotonic() - self._suspension_checked_at < SUSPENSION_CHECK_INTERVAL:
            return
        super().check_for_suspension(burst)  # returns once resumed
        self._suspension_checked_at = time.monotonic()

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        if pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline)


def _release_session() -> None:
    """Give the job's database connection back to the pool; one left mid-statement (RQ's job timeout
    interrupted it) cannot be rolled back, and is closed instead, so the worker goes on."""
    try:
        db.session.remove()
    except Exception:  # noqa: BLE001 - whatever state the job left, the next job gets a clean session
        log.warning("discarding a database connection the job left mid-statement", exc_info=True)
        with contextlib.suppress(Exception):
            db.session.invalidate()
        db.session.registry.clear()


def build_worker(app: Flask, queue_names: list[str] | None = None, **kwargs) -> AppWorker:
    """A worker for `app`'s queues (or `queue_names`) on `app`'s Redis."""
    connection = app.extensions["redis"]
    queues = [Queue(name, connection=connection) for name in (queue_names or app.config["QUEUES"])]
    # RQ gives the key `worker_ttl` + 60 s between jobs and a job's timeout + 60 s during one; RQ
    # blocks on an empty queue for `worker_ttl` - 15 s, so it stays at a minute at least.
    kwargs.setdefault("worker_ttl", max(app.config["JOB_TIMEOUT"], 60))
    worker = AppWorker(queues, connection=connection, **kwargs)
    worker.app = app
    return worker
