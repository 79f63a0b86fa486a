"""The `worker` process: builds the app once, then runs an RQ worker on the configured queues.

RQ's own scheduler runs inside it (`with_scheduler`): it moves retries waiting out their
`RETRY_INTERVALS` back onto the queue. `--burst` drains the queues and exits.
"""

import argparse

from app import create_app
from app.messaging.worker import build_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    args = parser.parse_args()
    # No pre-ping round trip per job: a dropped connection fails one attempt, and RQ retries it.
    app = create_app(overrides={"SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": False}})
    build_worker(app).work(burst=args.burst, with_scheduler=True, logging_level=app.config["LOG_LEVEL"])


if __name__ == "__main__":
    main()
