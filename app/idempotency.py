"""`Idempotency-Key` for the POSTs that create, send or send again: a repeat replays the first answer.

How a request with a key runs:
1. Its row is inserted as "in progress" in a transaction of its own, committed at once; the unique
   (owner, key) constraint lets only one request win the key.
2. The winner runs the view and stores the answer (status and body) on the row. A 5xx or a crash
   stores nothing: the row is deleted so that the client can retry with the same key.
3. A request that loses the key reads the row: another body (or endpoint) is a 409; a stored answer
   is replayed (with `Idempotent-Replayed: true`) and nothing else runs; a first request still in
   progress is waited for, polling, up to `IDEMPOTENCY_WAIT` seconds, then answered 409.

Keys are per API key owner and kept `IDEMPOTENCY_TTL` seconds; an expired row is taken over by the
next request with its key, and the reconciler deletes expired rows. An in-progress row older than
`IDEMPOTENCY_ABANDON_AFTER` (its request died with its process) is taken over the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from datetime import timedelta

from flask import Response, current_app, request
from marshmallow import Schema, validate
from sqlalchemy import Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from app import clock
from app.auth import current_owner
from app.blueprint import Blueprint
from app.errors import AppError, ConflictError
from app.extensions import db
from app.models import IdempotencyKey
from app.schemas import ErrorSchema, Text

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
_POLL_INTERVAL = 0.05
_table = IdempotencyKey.__table__


class IdempotencyHeaderSchema(Schema):
    idempotency_key = Text(
        data_key=HEADER,
        validate=validate.Length(min=1, max=255),
        metadata={
            "description": "Any unique string, e.g. a UUID. A repeat with the same key and body within 24 h "
            "replays the first answer and does nothing else; the same key with another body is a 409."
        },
    )


def request_fingerprint() -> str:
    """SHA-256 of the method, the path and the body; a JSON body counts by value, not by formatting."""
    raw = request.get_data()
    try:
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        body = raw
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def _taken_over(row: Row, now) -> bool:
    config = current_app.config
    if row.created_at <= now - timedelta(seconds=config["IDEMPOTENCY_TTL"]):
        return True
    return row.status_code is None and row.created_at <= now - timedelta(seconds=config["IDEMPOTENCY_ABANDON_AFTER"])


def _claim(owner: str, key: str, request_hash: str) -> int | Row | None:
    """Win the key (returns the new row's id) or read the row that holds it; None when that row went
    away or was taken over meanwhile (try again)."""
    now = clock.now()
    try:
        with db.engine.begin() as conn:
            return conn.execute(
                insert(_table)
                .values(owner=owner, key=key, request_hash=request_hash, created_at=now)
                .returning(_table.c.id)
            ).scalar_one()
    except IntegrityError:
        pass
    with db.engine.begin() as conn:
        row = conn.execute(select(_table).where(_table.c.owner == owner, _table.c.key == key)).one_or_none()
        if row is None or not _taken_over(row, now):
            return row
        # Only one of several requests taking over the same stale row sees its own update succeed.
        taken = conn.execute(
            update(_table)
            .where(_table.c.id == row.id, _table.c.created_at == row.created_at)
            .values(request_hash=request_hash, status_code=None, response_body=None, created_at=now)
        ).rowcount
        return row.id if taken else None


def _store(row_id: int, response: Response) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            update(_table)
            .where(_table.c.id == row_id)
            .values(status_code=response.status_code, response_body=response.get_data(as_text=True))
        )


def _release(row_id: int) -> None:
    with db.engine.begin() as conn:
        conn.execute(delete(_table).where(_table.c.id == row_id))


def _replay(row: Row) -> Response:
    response = current_app.response_class(row.response_body, status=row.status_code, mimetype="application/json")
    response.headers[REPLAYED_HEADER] = "true"
    return response


def _run(row_id: int, view: Callable, args: tuple, kwargs: dict) -> Response:
    """Run the view as the key's first request and keep its answer, unless it is a 5xx."""
    try:
        response = current_app.make_response(view(*args, **kwargs))
    except (AppError, HTTPException) as exc:
        response = current_app.make_response(current_app.handle_user_exception(exc))
    except BaseException:
        _release(row_id)
        raise
    if response.status_code >= 500:
        _release(row_id)
    else:
        _store(row_id, response)
    return response


def run_once(key: str, view: Callable, args: tuple, kwargs: dict) -> Response:
    """Answer a request carrying `key`: run the view once per key and body, replay it afterwards."""
    owner = current_owner() or "anonymous"
    request_hash = request_fingerprint()
    deadline = time.monotonic() + current_app.config["IDEMPOTENCY_WAIT"]
    while True:
        claimed = _claim(owner, key, request_hash)
        if isinstance(claimed, int):
            return _run(claimed, view, args, kwargs)
        if claimed is not None:
            if claimed.request_hash != request_hash:
                raise ConflictError(
                    f"{HEADER} {key!r} was used with another request; use a new key for a new request",
                    {HEADER: ["used with another request"]},
                )
            if claimed.status_code is not None:
                return _replay(claimed)
            if time.monotonic() >= deadline:
                raise ConflictError(
                    f"a request with {HEADER} {key!r} is in progress; retry later", {HEADER: ["in progress"]}
                )
        time.sleep(_POLL_INTERVAL)


def idempotent(bp: Blueprint) -> Callable[[Callable], Callable]:
    """Decorate a POST view of `bp` (outermost, above `bp.arguments`) to honour `Idempotency-Key`,
    and document the header and its 409."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args, idempotency_key: str | None = None, **kwargs):
            if idempotency_key is None:
                return view(*args, **kwargs)
            return run_once(idempotency_key, view, args, kwargs)

        documented = bp.alt_response(
            409,
            schema=ErrorSchema,
            description=f"{HEADER} used with another request, or its first request is still in progress",
        )(wrapper)
        return bp.arguments(IdempotencyHeaderSchema, location="headers", as_kwargs=True)(documented)

    return decorator


def purge_expired() -> int:
    """Delete the idempotency keys older than `IDEMPOTENCY_TTL`; returns how many."""
    cutoff = clock.now() - timedelta(seconds=current_app.config["IDEMPOTENCY_TTL"])
    deleted = db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)).rowcount
    db.session.commit()
    return deleted
