"""Imports too big to answer within the request (over `IMPORT_SYNC_MAX_BYTES`) run as a job.

The upload is stored in the database in chunks of `CHUNK_BYTES` (the worker may run on another machine,
and Redis may lose data) beside a `customer_imports` row, and a job on the control queue, its id derived
from the import's, imports it. Each batch's upsert commits TOGETHER with the import row's progress (where
in the upload the batch ended, the running counts and errors), so a job that dies resumes where the
last committed batch ended and the counts stay exact. Before a batch, a run takes the import row's lock
on the condition that the progress is still what it last wrote: two runs of one import (a re-enqueued
job beside a slow one) never both write a batch. The reconciler queues the job again for an import left
queued or running whose job is lost. The chunks are deleted when the import ends.
"""

from __future__ import annotations

import io
import logging
from typing import IO

from flask import current_app
from redis.exceptions import RedisError
from rq import Retry
from sqlalchemy import delete, insert, select, update

from app import clock
from app.customers.csv_import import ImportReport, LineSource, import_customers, read_batches, read_header, write_batch
from app.errors import NotFoundError, ValidationFailed
from app.extensions import db
from app.messaging import lifecycle
from app.models import CustomerImport, CustomerImportChunk, ImportStatus
from app.queues import get_control_queue

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
IMPORT_JOB = "app.customers.import_jobs.run_import"
IMPORT_JOB_TIMEOUT = 3600  # a run stopped by it resumes where it was, when RQ retries it
# Runs without progress after which an import is given up as failed.
MAX_ATTEMPTS = 5

_imports = CustomerImport.__table__
_chunks = CustomerImportChunk.__table__


def import_job_id(import_id: int) -> str:
    """The RQ job id of an import (RQ allows letters, digits, `_` and `-`)."""
    return f"customer_import-{import_id}"


def get_import(import_id: int) -> CustomerImport:
    customer_import = db.session.get(CustomerImport, import_id)
    if customer_import is None:
        raise NotFoundError(f"import {import_id} not found")
    return customer_import


def import_upload(upload: IO[bytes]) -> ImportReport | CustomerImport:
    """Import a whole, seekable upload: at once when it is at most `IMPORT_SYNC_MAX_BYTES` (the
    report), else as a job (the import, queued). A bad header is a `ValidationFailed` either way."""
    size = upload.seek(0, io.SEEK_END)
    upload.seek(0)
    if size <= current_app.config["IMPORT_SYNC_MAX_BYTES"]:
        return import_customers(upload)
    return create_import(upload, size)


def create_import(upload: IO[bytes], size: int) -> CustomerImport:
    """Store the upload and its import row in one transaction, then queue its job."""
    read_header(LineSource(upload))  # a bad header is a 422 now, not a failed import later
    upload.seek(0)
    customer_import = CustomerImport(status=ImportStatus.QUEUED, bytes_total=size)
    db.session.add(customer_import)
    db.session.flush()
    start = 0
    while chunk := upload.read(CHUNK_BYTES):
        db.session.execute(insert(_chunks), {"import_id": customer_import.id, "start": start, "data": chunk})
        start += len(chunk)
    db.session.commit()
    enqueue_import(customer_import.id)
    return customer_import


def enqueue_import(import_id: int) -> None:
    """After the commit of the import row: queue its job. Redis being down only delays it: the
    reconciler queues imports whose job is lost."""
    try:
        get_control_queue().enqueue(
            IMPORT_JOB,
            args=(import_id,),
            job_id=import_job_id(import_id),
            job_timeout=IMPORT_JOB_TIMEOUT,
            result_ttl=600,
            retry=Retry(max=3, interval=[1, 5, 30]),
            description=f"import customers ({import_id})",
        )
    except RedisError:
        log.warning("could not queue the import's job", extra={"import_id": import_id}, exc_info=True)


class UploadReader(io.RawIOBase):
    """The stored upload of an import from byte `position` on, fetched a chunk (one query) at a time."""

    def __init__(self, import_id: int, position: int = 0):
        self.import_id = import_id
        self.position = position
        self._chunk = b""
        self._chunk_start = position

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        offset = self.position - self._chunk_start
        if offset >= len(self._chunk):
            row = db.session.execute(
                select(_chunks.c.start, _chunks.c.data)
                .where(_chunks.c.import_id == self.import_id, _chunks.c.start <= self.position)
                .order_by(_chunks.c.start.desc())
                .limit(1)
            ).first()
            if row is None or self.position >= row.start + len(row.data):
                return 0
            self._chunk_start, self._chunk = row.start, row.data
            offset = self.position - row.start
        size = min(len(buffer), len(self._chunk) - offset)
        buffer[:size] = self._chunk[offset : offset + size]
        self.position += size
        return size


def _open_upload(import_id: int, position: int = 0) -> IO[bytes]:
    return io.BufferedReader(UploadReader(import_id, position), buffer_size=64 * 1024)


def _claim(import_id: int) -> CustomerImport | None:
    """Mark the import running (from queued, or running for a run that resumes), counting the run;
    None when it is done, failed or unknown."""
    claimed = lifecycle.start_import(import_id)
    db.session.commit()
    return db.session.get(CustomerImport, import_id) if claimed else None


def _end(import_id: int, status: str, reason: str | None = None) -> None:
    """End the import (in the caller's transaction) and delete its upload."""
    lifecycle.end_import(import_id, status, reason)
    db.session.execute(delete(_chunks).where(_chunks.c.import_id == import_id))


def _lock_progress(import_id: int, bytes_done: int) -> bool:
    """Lock the import row if it is running and its progress is still `bytes_done`: the first statement
    of a batch's transaction, so its lock comes before any customer row's."""
    return (
        db.session.execute(
            update(_imports)
            .where(
                _imports.c.id == import_id,
                _imports.c.status == ImportStatus.RUNNING,
                _imports.c.bytes_done == bytes_done,
            )
            .values(updated_at=clock.now())
        ).rowcount
        == 1
    )


def _save_progress(import_id: int, end_offset: int, end_line: int, report: ImportReport, errors_changed: bool) -> None:
    values = {
        "bytes_done": end_offset,
        "lines_done": end_line,
        "created_count": report.created,
        "updated_count": report.updated,
        "invalid_count": report.invalid,
        "attempts": 0,
        "updated_at": clock.now(),
    }
    if errors_changed:
        values.update(errors=list(report.errors), errors_truncated=report.errors_truncated)
    db.session.execute(update(_imports).where(_imports.c.id == import_id).values(**values))


def run_import(import_id: int) -> str:
    """The import's job: import the stored upload from where the last committed batch ended, each
    batch committed with the import's progress; at the end the import is `done` and its upload
    deleted. Safe to run twice, and beside another run of the same import."""
    customer_import = _claim(import_id)
    if customer_import is None:
        return "nothing to do: the import is over, or unknown"
    if customer_import.attempts > MAX_ATTEMPTS:
        _end(import_id, ImportStatus.FAILED, f"gave up after {MAX_ATTEMPTS} runs that made no progress")
        db.session.commit()
        return "failed"
    done, lines = customer_import.bytes_done, customer_import.lines_done
    report = ImportReport(
        created=customer_import.created_count,
        updated=customer_import.updated_count,
        invalid=customer_import.invalid_count,
        errors=list(customer_import.errors),
        errors_truncated=customer_import.errors_truncated,
    )
    db.session.commit()
    source = LineSource(_open_upload(import_id))
    try:
        header = read_header(source)
    except ValidationFailed as exc:
        _end(import_id, ImportStatus.FAILED, exc.message)
        db.session.commit()
        return "failed"
    if done:
        source = LineSource(_open_upload(import_id, done), line=lines, offset=done)
    saved_errors = (len(report.errors), report.errors_truncated)
    for batch in read_batches(source, header, report):
        if not _lock_progress(import_id, done):
            db.session.rollback()
            return "stopped: another run of this import has moved on"
        write_batch(batch, header, report)
        errors = (len(report.errors), report.errors_truncated)
        _save_progress(import_id, batch.end_offset, batch.end_line, report, errors != saved_errors)
        if batch.last:
            _end(import_id, ImportStatus.DONE)
        db.session.commit()
        done, saved_errors = batch.end_offset, errors
    return f"done: created {report.created}, updated {report.updated}, invalid {report.invalid}"
