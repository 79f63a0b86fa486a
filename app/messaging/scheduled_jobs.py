"""Jobs waiting in RQ's scheduled registries: retries after `RETRY_INTERVALS`, throughput hand-backs,
`Retry-After` and quiet-hours postponements. Every worker process moves the due ones back onto their
queue (`DueJobMover`), and `/health` and `/metrics` count those overdue (`overdue_counts`).

RQ's own scheduler (`RQScheduler`, started by `Worker.work(with_scheduler=True)`) runs in a process forked
from one worker and holds a lock per queue (`rq:scheduler-lock:<queue>`, interval + 60 s), refreshed every
second; a worker that finds a lock taken tries again only at its maintenance, every 10 minutes, and a
scheduler process that dies on a Redis error is started again only then. So after the holder was killed,
due jobs waited for minutes while other workers ran (200 retries went back 598 s after their time).

The mover holds nothing between two moves, so no due job waits for a holder that died. Every worker
process runs one, every `MOVE_INTERVAL` seconds, whatever happens to its workers; two may look at the same
due jobs at once, and each job is still queued once: the move is one Lua script, which takes a job out of
the registry and queues it only if it was still there. For each job it does what RQ 3.0.0's scheduler
does through `Queue._enqueue_job`, written against that version (tests/test_scheduled_jobs.py compares the
two at the installed one): status `queued`, `enqueued_at`, `origin`, the default timeout if the job has
none, its TTL renewed, pushed at the back of the queue, or at the front for a retry with
`enqueue_at_front`. A job with RQ's own rate limit (none here) is taken out the same way and handed to RQ's
rate-limited enqueue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.utils import current_timestamp, now, utcformat

from app.periodic import Periodic

log = logging.getLogger(__name__)

# Seconds between two moves: a due job is back on its queue at most this long (plus a round trip) after
# RQ's time for it, which is its due time rounded down to the second.
MOVE_INTERVAL = 1.0
# Jobs moved per script call (RQ's scheduler moves 1,000 at a time too); a pass calls again while it finds
# that many due.
MOVE_BATCH = 1000
# A scheduled job due more than this many seconds ago counts as overdue (`/health`, `/metrics`).
OVERDUE_AFTER = 30

# KEYS[1]: the queue's scheduled registry; KEYS[2]: the queue.
# ARGV[1]: now, in whole seconds (RQ's scores); ARGV[2]: most jobs to move; ARGV[3]: `enqueued_at`, as RQ
# writes it; ARGV[4]: the queue's name; ARGV[5]: RQ's job key prefix; ARGV[6]: RQ's default job timeout.
# Returns {jobs queued, ids of rate-limited jobs taken out of the registry, ids looked at}. The jobs' keys
# are built here from RQ's prefix, as RQ's own rate-limit script builds them: one Redis, not a cluster.
_MOVE_DUE_JOBS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], 0, ARGV[1], 'LIMIT', 0, ARGV[2])
local queued, limited = 0, {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[5] .. id
  if redis.call('EXISTS', key) == 1 then  -- the id of a deleted job is dropped, as RQ drops it
    local job = redis.call('HMGET', key, 'ttl', 'enqueue_at_front', 'enqueue_at_front_on_retry', 'ended_at',
                           'rate_limit_key', 'rate_limit_concurrency')
    if job[5] and job[6] then
      table.insert(limited, id)
    else
      redis.call('HSET', key, 'status', 'queued', 'enqueued_at', ARGV[3], 'origin', ARGV[4])
      redis.call('HSETNX', key, 'timeout', ARGV[6])
      local ttl = tonumber(job[1])
      if ttl and ttl > 0 then
        redis.call('EXPIRE', key, ttl)
      end
      if job[2] == '1' or (job[3] == '1' and job[4] and job[4] ~= '') then
        redis.call('LPUSH', KEYS[2], id)
      else
        redis.call('RPUSH', KEYS[2], id)
      end
      queued = queued + 1
    end
  end
end
return {queued, limited, #ids}
"""


def move_due_jobs(connection: Redis, queue_names: Iterable[str]) -> int:
    """Move the jobs now due from the scheduled registries of `queue_names` onto their queues; how many were
    queued. Any number of processes may run it at once: each job is queued once."""
    script = connection.register_script(_MOVE_DUE_JOBS)  # EVALSHA; loaded again after a Redis restart
    moved = 0
    for name in queue_names:
        queue = Queue(name, connection=connection)
        keys = [scheduled_key(name), queue.key]
        looked_at = MOVE_BATCH
        while looked_at == MOVE_BATCH:
            args = [current_timestamp(), MOVE_BATCH, utcformat(now()), name, Job.redis_job_namespace_prefix]
            queued, limited, looked_at = script(keys=keys, args=[*args, Queue.DEFAULT_TIMEOUT])
            moved += queued
            for job_id in limited:  # taken out of the registry by this call only: no other process queues them
                job = Job.fetch(job_id.decode(), connection=connection)
                queue._enqueue_rate_limited_job(job, at_front=job.should_enqueue_at_front())
                moved += 1
    return moved


def scheduled_key(queue_name: str) -> str:
    """The key of the queue's scheduled registry, as RQ names it."""
    return ScheduledJobRegistry.key_template.format(queue_name)


def count_overdue(pipe: Pipeline, queue_names: Iterable[str]) -> None:
    """Add to `pipe`, for each queue, the count of its scheduled jobs due more than `OVERDUE_AFTER` seconds ago."""
    before = f"({time.time() - OVERDUE_AFTER}"
    for name in queue_names:
        pipe.zcount(scheduled_key(name), "-inf", before)


def overdue_counts(connection: Redis, queue_names: Iterable[str]) -> dict[str, int]:
    """Per queue, the scheduled jobs due more than `OVERDUE_AFTER` seconds ago; one round trip."""
    names = list(queue_names)
    with connection.pipeline(transaction=False) as pipe:
        count_overdue(pipe, names)
        return dict(zip(names, pipe.execute(), strict=True))


class DueJobMover(Periodic):
    """A daemon thread that moves the due jobs of `queue_names` every `interval` seconds until stopped. A
    move that fails (Redis down, stalled, restarting) is logged once per outage and tried again at the
    next: the thread never ends on an error."""

    def __init__(self, connection: Redis, queue_names: Iterable[str], interval: float = MOVE_INTERVAL) -> None:
        super().__init__(interval, "due-job-mover")
        self.connection = connection
        self.queue_names = list(queue_names)
        self._failures = 0

    def start(self) -> DueJobMover:
        """Move what is due now, before a worker first looks at the queues (a burst worker may end at once),
        then every `interval` seconds on the thread."""
        self.tick()
        return super().start()

    def tick(self) -> None:
        try:
            moved = move_due_jobs(self.connection, self.queue_names)
        except RedisError as exc:
            if not self._failures:
                log.warning(
                    "scheduled jobs: Redis failed (%s: %s); trying again every %.0f s",
                    type(exc).__name__,
                    exc,
                    self.interval,
                )
            self._failures += 1
            return
        except Exception:  # noqa: BLE001 - a bug must not stop the moves for good: the next one may work
            log.exception("scheduled jobs: the move failed; trying again in %.0f s", self.interval)
            return
        if self._failures:
            log.info("scheduled jobs: moved again after %d failed tries", self._failures)
            self._failures = 0
        if moved:
            log.debug("scheduled jobs: %d due jobs queued", moved)
