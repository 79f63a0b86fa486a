"""The RQ worker class the `worker` process runs.

`SimpleWorker` runs jobs in the worker process instead of forking a work horse per job: measured
here about 3x the jobs per second of the forking `Worker` (see README, "Worker"). A job that raises
is caught and recorded by RQ and the worker goes on; a job that hangs is stopped by RQ's timeout.
"""

from __future__ import annotations

from flask import Flask
from rq import Queue, SimpleWorker
from rq.job import Job

from app.extensions import db
from app.logs import worker_job_id


class AppWorker(SimpleWorker):
    """A `SimpleWorker` that runs each job inside an app context of an app built once per process,
    and returns the job's database connection to the pool afterwards."""

    app: Flask

    def execute_job(self, job: Job, queue: Queue) -> None:
        token = worker_job_id.set(job.id)
        with self.app.app_context():
            try:
                super().execute_job(job, queue)
            finally:
                db.session.remove()
                worker_job_id.reset(token)


def build_worker(app: Flask, queue_names: list[str] | None = None, **kwargs) -> AppWorker:
    """A worker for `app`'s queues (or `queue_names`) on `app`'s Redis."""
    connection = app.extensions["redis"]
    queues = [Queue(name, connection=connection) for name in (queue_names or app.config["QUEUES"])]
    worker = AppWorker(queues, connection=connection, **kwargs)
    worker.app = app
    return worker
