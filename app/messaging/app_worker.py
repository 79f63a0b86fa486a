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

Concurrency: a send spends most of its time waiting for the provider (100-500 ms), so one process runs
up to `WORKER_CONCURRENCY` jobs at once, each in a thread of its own with its own app context and
database connection: the main thread takes a job off the queue only when a thread is free, hands it
over, and goes back to the queue (and to its heartbeats). Each job is still one RQ job with RQ's own
bookkeeping (an execution per job, its timeout enforced by RQ's `TimerDeathPenalty` in a thread),
retried by RQ's Retry. A warm shutdown (SIGTERM, SIGINT) takes no new job and waits for the jobs in
flight to finish and be recorded; a second signal within a second is the same request, a later one ends
the process at once (the metrics flushed first), and the reconciler sends again what was in flight. In
burst mode the worker ends only when the queues are empty and no job is in flight (a job that fails may
put its retry back on the queue). With SQLite (development) the worker runs one job at a time: SQLite
takes one writer at a time.

Scheduled jobs (retries, hand-backs, postponements) are moved back onto their queue by the process that
runs the worker (`scheduled_jobs.DueJobMover`, see worker.py), not by RQ's scheduler, which it refuses.

Connections: RQ gets a Redis connection of its own (`build_worker`), whose socket timeout it raises above
its blocking wait for a job (`connection_timeout`, 55 s by default); the jobs' calls to Redis (the
throughput slot, the metrics) keep the app's connection and its short `REDIS_SOCKET_TIMEOUT`.

Liveness: RQ keeps a killed worker registered until its key expires (minutes), and a flushed Redis
forgets a live one until it restarts. So each heartbeat also records, in the sorted set
`LIVE_WORKERS_KEY` (member: the worker's name), the time by which the worker's next heartbeat is due:
`WORKER_HEARTBEAT_INTERVAL` ahead when it waits for a job (it blocks that long on the queues, then
heartbeats), the job's timeout ahead when it starts one (it heartbeats again when the job ends, or RQ
stops the job at its timeout), plus `LIVENESS_GRACE`. The ZADD rides in the heartbeat's own round
trip. `/health` counts the members whose time has not passed (`live_worker_count`); a clean exit
removes the worker, and after a flush its next heartbeat adds it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from flask import Flask
from redis import ConnectionPool, Redis
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.connections import parse_connection
from rq.defaults import DEFAULT_WORKER_TTL
from rq.exceptions import StopRequested
from rq.job import Job
from rq.timeouts import BaseDeathPenalty, TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from app.extensions import db
from app.logs import worker_job_id
from app.messaging import stats
from app.messaging.send.window import SEND_JOB

log = logging.getLogger(__name__)

# A heartbeat is skipped when the worker key would expire at most this many seconds later than it
# already does.
HEARTBEAT_SLACK = 1.0
# How often the worker looks for `rq suspend`.
SUSPENSION_CHECK_INTERVAL = 1.0
# The sorted set of live workers: member the worker's name, score the Unix time its next heartbeat is due by.
LIVE_WORKERS_KEY = "campaign_dispatch:live_workers"
# Added to that time: a heartbeat skipped as too soon (HEARTBEAT_SLACK), its round trip, RQ's maintenance
# between two waits, clock skew between hosts.
LIVENESS_GRACE = 5.0
# A second SIGTERM or SIGINT this soon after the first is the same request (RQ 3.0's own window).
SAME_REQUEST_WINDOW = timedelta(seconds=1)
# The longest a cold shutdown waits for the metrics' last flush (one round trip, REDIS_SOCKET_TIMEOUT at most).
COLD_SHUTDOWN_FLUSH_WAIT = 2.0


class AppWorker(SimpleWorker):
    """A `SimpleWorker` that runs each job inside an app context of an app built once per process,
    returns the job's database connection to the pool afterwards, and spends fewer Redis round
    trips on its own bookkeeping (see the module's doc)."""

    app: Flask
    stop_requested: bool = False  # a SIGTERM or SIGINT asked this worker to stop
    _key_expires_at: float = 0.0  # monotonic time at which the last heartbeat lets the worker key expire
    _suspension_checked_at: float = float("-inf")
    _job_timeout: int | None = None  # the timeout of the job being run, None between jobs

    def __init__(self, *args, heartbeat_interval: int | None = None, concurrency: int = 1, **kwargs) -> None:
        self.heartbeat_interval = heartbeat_interval  # before RQ's __init__, which reads dequeue_timeout
        super().__init__(*args, **kwargs)
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="job") if concurrency > 1 else None
        self._free = threading.Semaphore(concurrency)  # a slot per thread; taken before a job is dequeued
        self._in_flight = 0
        self._settled = threading.Condition()  # notified when a job in flight ends
        self._handing_over = False  # between taking a job off the queue and handing it to a thread
        self._burst = False

    @property
    def death_penalty_class(self) -> type[BaseDeathPenalty]:
        """RQ's job timeout: SIGALRM in the main thread (the only one that receives signals), a timer that
        raises in the job's own thread otherwise."""
        return UnixSignalDeathPenalty if threading.current_thread() is threading.main_thread() else TimerDeathPenalty

    @property
    def dequeue_timeout(self) -> int:
        """How long an idle worker blocks on its queues before it heartbeats again."""
        return self.heartbeat_interval or super().dequeue_timeout

    @property
    def connection_timeout(self) -> int:
        """The socket timeout RQ sets on the worker's connection (above the app's REDIS_SOCKET_TIMEOUT):
        above the blocking wait for a job, and no shorter than RQ's own, so that a stall stops a worker
        no sooner than it would without the shorter wait."""
        return max(self.dequeue_timeout, self.worker_ttl - 15) + 10

    def work(self, burst: bool = False, with_scheduler: bool = False, **kwargs) -> bool:
        if with_scheduler:
            # RQ's scheduler holds a lock per queue that a killed holder keeps for a minute, and others retry
            # only every 10 minutes; its non-atomic move beside ours could also queue a job twice.
            raise ValueError("AppWorker runs without RQ's scheduler: run a scheduled_jobs.DueJobMover beside it")
        self._burst = burst
        folder = stats.Folder(self.app).start()  # keeps the campaigns' stats cheap to read
        try:
            return super().work(burst=burst, **kwargs)
        finally:
            folder.stop()

    def request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self._pool is None:
            self._run(job, queue)
            return
        with self._settled:
            self._in_flight += 1
        self._pool.submit(self._run_in_thread, job, queue)
        self._handing_over = False

    def _run(self, job: Job, queue: Queue) -> None:
        """Run `job` in this thread, like RQ's `SimpleWorker`."""
        with self._job_context(job):
            try:
                super().execute_job(job, queue)
            finally:
                self._job_timeout = None

    @contextlib.contextmanager
    def _job_context(self, job: Job) -> Iterator[None]:
        """An app context for the job, its id in the log lines, and a clean database session after it."""
        if job.func_name == SEND_JOB and job.retries_left:
            # One meaning for RETRY_INTERVALS: the worker that runs a failed attempt decides the delay
            # before the next, whichever process enqueued the job.
            job.retry_intervals = self.app.config["RETRY_INTERVALS"]
        token = worker_job_id.set(job.id)
        with self.app.app_context():
            try:
                yield
            finally:
                _release_session()
                worker_job_id.reset(token)

    def _run_in_thread(self, job: Job, queue: Queue) -> None:
        try:
            execution = self.prepare_execution(job)
            with self._job_context(job):
                self.perform_job(job, queue, execution)
        except Exception:  # noqa: BLE001 - RQ's own bookkeeping failed (Redis went away): the job is
            # left to RQ's registries and the reconciler; the thread takes the next job
            log.warning("job %s could not be run or recorded by RQ", job.id, exc_info=True)
        finally:
            with self._settled:
                self._in_flight -= 1
                idle = self._in_flight == 0
                self._settled.notify_all()
            self._free.release()
            if idle:
                with contextlib.suppress(Exception):
                    # Written whatever this process last wrote: a thread's BUSY, queued in its job's pipeline,
                    # can reach Redis after the main thread's IDLE, so the state skipped as "already idle"
                    # could stay BUSY in Redis (seen as a worker busy forever, about one run in eight).
                    super().set_state(WorkerStatus.IDLE)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's dequeue, once a thread is free (heartbeating while none is); in burst mode, an empty
        queue ends the work only once no job is in flight (a failed one may queue its retry)."""
        if self._pool is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._free.acquire(timeout=self.dequeue_timeout):
            self.heartbeat()
        try:
            self.check_for_suspension(self._burst)  # it may have come while every thread was busy
            while True:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
                if result is not None:
                    self._handing_over = True
                    return result
                if timeout is not None or not self._wait_for_jobs_in_flight():
                    break
        except BaseException:
            self._free.release()
            raise
        self._free.release()
        return None

    def _wait_for_jobs_in_flight(self) -> bool:
        """Wait until no job is in flight; whether there were any."""
        with self._settled:
            waited = self._in_flight > 0
            while self._in_flight:
                self._settled.wait(timeout=self.dequeue_timeout)
        return waited

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if self._pool is None:
            # Its heartbeat promises the next one within the job's timeout, not within an idle wait. (With
            # threads the main thread goes on heartbeating while jobs run.)
            self._job_timeout = DEFAULT_WORKER_TTL if job.timeout in (None, -1) else int(job.timeout)
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    def _shutdown(self) -> None:
        """A warm shutdown: with threads, take no new job, and let those in flight finish (see `teardown`)."""
        if self._pool is None:
            super()._shutdown()
            return
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if not self._handing_over:  # a job just taken off the queue is handed over first
            raise StopRequested()

    def request_force_stop(self, signum, frame) -> None:
        """A second signal. Within `SAME_REQUEST_WINDOW` of the first it is the same request (a process
        manager and a terminal both signalling), as RQ has it; a later one ends the process now: the sends in
        flight are abandoned, to be sent again by the reconciler, and the metrics counted so far are flushed."""
        if self._shutdown_requested_date is not None and now() - self._shutdown_requested_date < SAME_REQUEST_WINDOW:
            log.info("a second stop signal within %s of the first: the same warm shutdown", SAME_REQUEST_WINDOW)
            return
        if self._pool is not None and self._in_flight:
            log.warning("cold shutdown: %d jobs in flight abandoned", self._in_flight)
            self._flush_metrics(COLD_SHUTDOWN_FLUSH_WAIT)
            with contextlib.suppress(Exception):
                self.register_death()
            os._exit(1)
        super().request_force_stop(signum, frame)  # raises SystemExit: `teardown` flushes the metrics

    def _flush_metrics(self, timeout: float) -> None:
        """Flush the metrics counted so far, waiting `timeout` seconds at most: from a signal handler, on a
        thread of its own, so that a lock the interrupted main thread holds cannot hang the exit."""
        flusher = threading.Thread(target=self.app.extensions["metrics"].flush, name="metrics-last-flush", daemon=True)
        flusher.start()
        flusher.join(timeout)

    def teardown(self) -> None:
        if self._pool is not None:
            if self._in_flight:
                log.info("waiting for %d jobs in flight", self._in_flight)
            self._pool.shutdown(wait=True)
        self.app.extensions["metrics"].flush()  # the jobs' counts (app.metrics), before a burst worker's process ends
        super().teardown()

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        ttl = timeout or self.worker_ttl + 60
        expires_at = time.monotonic() + ttl
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)  # part of a round trip RQ makes anyway
            self._record_liveness(pipeline)
        elif expires_at - self._key_expires_at <= HEARTBEAT_SLACK:
            return
        else:
            with self.connection.pipeline(transaction=False) as batch:
                super().heartbeat(timeout, batch)
                self._record_liveness(batch)
                batch.execute()
        # EXPIRE replaces the key's expiry, even with a shorter one (a job's own heartbeat TTL).
        self._key_expires_at = expires_at

    def _record_liveness(self, pipeline: Pipeline) -> None:
        """Add to `pipeline` the time by which this worker's next heartbeat is due (see the module's doc)."""
        within = self._job_timeout if self._job_timeout is not None else self.dequeue_timeout
        pipeline.zadd(LIVE_WORKERS_KEY, {self.name: time.time() + within + LIVENESS_GRACE})

    def register_death(self) -> None:
        super().register_death()
        self.connection.zrem(LIVE_WORKERS_KEY, self.name)

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


def _connection_like(connection: Redis) -> Redis:
    """A new connection (and pool) to the same Redis with the same options: RQ raises the socket timeout of
    the connection it is given above its wait for a job (`AppWorker.connection_timeout`), and the jobs' own
    calls to Redis (the throughput slot, the metrics) must keep the app's `REDIS_SOCKET_TIMEOUT`."""
    connection_class, pool_class, options = parse_connection(connection)
    return connection_class(connection_pool=ConnectionPool(connection_class=pool_class, **options))


def live_worker_count(connection: Redis) -> int:
    """How many workers have heartbeated and are not yet overdue for their next heartbeat. Members
    that are overdue (killed workers) are removed on the way; one round trip."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(LIVE_WORKERS_KEY, "-inf", time.time())
        pipe.zcard(LIVE_WORKERS_KEY)
        return pipe.execute()[1]


def build_worker(app: Flask, queue_names: list[str] | None = None, **kwargs) -> AppWorker:
    """A worker for `app`'s queues (or `queue_names`) on `app`'s Redis, through a connection of RQ's own."""
    connection = _connection_like(app.extensions["redis"])
    queues = [Queue(name, connection=connection) for name in (queue_names or app.config["QUEUES"])]
    # RQ gives the key `worker_ttl` + 60 s between jobs and a job's timeout + 60 s during one: it
    # stays at a minute at least. An idle worker heartbeats every WORKER_HEARTBEAT_INTERVAL seconds.
    kwargs.setdefault("worker_ttl", max(app.config["JOB_TIMEOUT"], 60))
    kwargs.setdefault("heartbeat_interval", app.config["WORKER_HEARTBEAT_INTERVAL"])
    sqlite = app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite")
    kwargs.setdefault("concurrency", 1 if sqlite else app.config["WORKER_CONCURRENCY"])
    worker = AppWorker(queues, connection=connection, **kwargs)
    worker.app = app
    return worker
