"""The scheduler class the `scheduler` process runs.

rq-scheduler's own loop exits on the first Redis error (a refused connection, a read timeout while
Redis stalls), and registers the periodic jobs once, at start, so a flushed Redis silently switches
them off. `AppScheduler` runs the same loop (heartbeat, lock, move due jobs to their queues, unlock)
and also:
- rides out Redis errors: each failed pass logs one line with the wait, then it waits (1 s, doubling
  to 30 s) and tries again, start-up included, until Redis answers;
- on each pass, while it holds the lock, puts back the periodic jobs Redis no longer holds (one
  round trip), so a flush delays them by one `SCHEDULER_INTERVAL` at most;
- after a failure, releases the lock if its own (a stall may have let its SET through unanswered),
  rather than leave every scheduler waiting out the lock's expiry.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from flask import current_app
from redis.exceptions import RedisError
from rq_scheduler import Scheduler

from app.messaging.triggers import register_periodic_jobs, restore_periodic_jobs
from app.queues import get_control_queue, get_redis

log = logging.getLogger(__name__)

# The wait after a failed pass starts here and doubles, up to the cap.
RETRY_FIRST_WAIT = 1.0
RETRY_MAX_WAIT = 30.0


class AppScheduler(Scheduler):
    """rq-scheduler's `Scheduler`, with a run loop that outlives Redis failures and restores the
    periodic jobs (see the module's doc)."""

    _failures = 0  # consecutive failed passes

    def run(self, burst: bool = False) -> None:
        """Register the periodic jobs, then every `interval` seconds move the due jobs to their queues,
        until stopped (SIGTERM, SIGINT) or, with `burst`, after one pass."""
        self._install_signal_handlers()
        try:
            self._until_it_succeeds(lambda: register_periodic_jobs(self))
            while True:
                started = time.monotonic()
                self._until_it_succeeds(self._pass)
                if burst:
                    break
                time.sleep(max(0.0, self._interval - (time.monotonic() - started)))
        finally:
            self._leave()

    def _until_it_succeeds(self, step: Callable[[], object]) -> None:
        """Run `step` until it gets through without a Redis error, waiting longer after each failure."""
        while True:
            try:
                if self._failures:
                    self._release_own_lock()
                step()
            except RedisError as exc:
                wait = min(RETRY_FIRST_WAIT * 2**self._failures, RETRY_MAX_WAIT)
                self._failures += 1
                log.warning(
                    "scheduler: Redis failed (%s: %s); retrying in %.0f s",
                    type(exc).__name__,
                    exc,
                    wait,
                    extra={"retry_in": wait, "failures": self._failures},
                )
                time.sleep(wait)
                continue
            if self._failures:
                log.info("scheduler: Redis answers again after %d failed tries", self._failures)
                self._failures = 0
            return

    def _pass(self) -> None:
        """One pass of rq-scheduler's loop, restoring lost periodic jobs while it holds the lock."""
        self.heartbeat()
        if not self.acquire_lock():
            log.debug("scheduler: another scheduler holds the lock; skipping this pass")
            return
        restored = restore_periodic_jobs(self)
        if restored:
            log.warning(
                "scheduler: periodic jobs were missing from Redis; registered again",
                extra={"jobs": [job.job_id() for job in restored]},
            )
        self.enqueue_jobs()
        self.heartbeat()
        self.remove_lock()

    def heartbeat(self) -> None:
        # Registers the scheduler again when its key is gone (a flush, a restart of Redis).
        if not self.connection.expire(self.key, int(self._interval) + 10):
            self.register_birth()

    def register_birth(self) -> None:
        # rq-scheduler refuses a name already registered; this name is a fresh uuid, and a birth retried
        # after a timeout may have been written by the try that timed out.
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, "birth", time.time())
            pipe.expire(self.key, int(self._interval) + 10)
            pipe.execute()

    def acquire_lock(self) -> bool:
        # The lock names its holder, so that a scheduler can tell its own lock after a failure.
        self._lock_acquired = bool(
            self.connection.set(self.scheduler_lock_key, self.name, ex=int(self._interval) + 10, nx=True)
        )
        return self._lock_acquired

    def _release_own_lock(self) -> None:
        if self.connection.get(self.scheduler_lock_key) == self.name.encode():
            self.connection.delete(self.scheduler_lock_key)
        self._lock_acquired = False

    def _install_signal_handlers(self) -> None:
        # rq-scheduler's handlers write to Redis, and would raise a Redis error instead of exiting while
        # Redis is down; the cleanup is `_leave`, on the way out.
        def stop(signum, frame):
            log.info("scheduler: shutting down")
            raise SystemExit()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def _leave(self) -> None:
        """Release the lock and register the scheduler's death, if Redis lets it."""
        try:
            self.remove_lock()
            self.register_death()
        except RedisError:
            log.warning("scheduler: could not unregister from Redis on the way out")


def build_scheduler() -> AppScheduler:
    """The current app's scheduler: campaign-level jobs go to the control queue."""
    return AppScheduler(
        queue=get_control_queue(), connection=get_redis(), interval=current_app.config["SCHEDULER_INTERVAL"]
    )
