"""The `worker` process: builds the app once, then runs an RQ worker on the configured queues.

Beside it, for the life of the process, a thread moves the jobs waiting in RQ's scheduled registries
(retries waiting out `RETRY_INTERVALS`, hand-backs, postponements) back onto their queue once due
(`app.messaging.scheduled_jobs`; RQ's own scheduler is not used). `--burst` drains the queues and exits.
Redis going away does not end the process: RQ waits for it while dequeueing, a worker that quits on a
Redis error anywhere else (at start, between jobs) is replaced by a new one once Redis answers again, and
the mover tries again every second. Another thread applies what waited in Redis while PostgreSQL was
unavailable (sends' records, receipts, keywords: `app.messaging.spool`) once it is back.
"""

import argparse
import logging
import sys
import time

from redis.exceptions import RedisError

from app import create_app
from app.messaging import deferred
from app.messaging.app_worker import build_worker
from app.messaging.scheduled_jobs import DueJobMover
from config import SettingsError

log = logging.getLogger("worker")

# Seconds between attempts to start a worker while Redis is unreachable: doubling up to the cap.
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0


def run(app, burst: bool) -> None:
    """Work until stopped (SIGTERM, SIGINT) or, with `burst`, until the queues are empty; move due scheduled
    jobs meanwhile, through the workers' restarts too."""
    mover = DueJobMover(app.extensions["redis"], app.config["QUEUES"]).start()
    with app.app_context():
        drainer = deferred.drainer().start()  # what waited in Redis for the database, applied when it returns
    try:
        _work(app, burst)
    finally:
        drainer.stop()
        mover.stop()


def _work(app, burst: bool) -> None:
    delay = FIRST_RETRY_DELAY
    while True:
        try:
            worker = build_worker(app)  # RQ names it in Redis already
            worker.work(burst=burst, logging_level=app.config["LOG_LEVEL"])
        except RedisError as exc:
            log.warning("Redis unavailable (%s: %s); starting a new worker in %.0f s", type(exc).__name__, exc, delay)
        else:
            if burst or worker.stop_requested:
                return
            log.warning("the worker quit (see above); starting a new worker in %.0f s", delay)
        time.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_DELAY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    args = parser.parse_args()
    try:
        # Its own connection budget (WORKER_DATABASE_POOL_SIZE), and no pre-ping round trip per job: a
        # dropped connection fails one attempt, and RQ retries it.
        app = create_app(overrides={"WORKER_PROCESS": True, "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": False}})
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")
    run(app, args.burst)


if __name__ == "__main__":
    main()
