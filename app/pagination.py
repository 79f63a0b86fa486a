"""One pagination helper for every list endpoint: numbered pages, or an opaque cursor.

Every list is newest first, by id. A numbered page (`page`, `page_size`) is an OFFSET: it counts the rows
before it and shifts when rows are added. A cursor page reads the `page_size` rows with an id below the
cursor's, through the same index as the first page, so the 5,000th page costs what the first does; and as
ids are never reused or changed, a client walking a list by cursor sees every row that existed when it
started exactly once, whatever is inserted or updated meanwhile (rows inserted after it started may or
may not appear; under a filter on a status, a row whose status changes meanwhile may be seen in none or
both of its pages). Every page answers `next_cursor`, the cursor of the page after it (null on the last),
so a client may start with page 1 and go on by cursor. A cursor page counts nothing: its `page`, `total`
and `total_pages` are null. A cursor carries an HMAC of its content keyed with the service's secret key
(`app.secrets`): one the service did not issue as it is, is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from flask import current_app
from sqlalchemy import ColumnElement, Select, func, select

from app.errors import ValidationFailed
from app.extensions import db
from app.schemas import MAX_ID
from app.secrets import secret_key

CURSOR_VERSION = 2  # 1: the cursors before they carried a proof, refused since
# What a cursor's proof is made for: mixed into the HMAC, so that nothing else signed with the secret key
# (a session cookie) can pass for a cursor, nor a cursor for it.
_PURPOSE = b"pagination-cursor\x00"
_FIELDS = {"v", "list", "before"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _proof(body: bytes) -> bytes:
    """The HMAC-SHA256 of a cursor's body, keyed with the service's secret key."""
    return hmac.new(secret_key(current_app), _PURPOSE + body, hashlib.sha256).digest()


def encode_cursor(listing: str, before_id: int) -> str:
    """An opaque cursor: the page after it has the rows of `listing` with an id below `before_id`. Its body
    (`{"v", "list", "before"}`, base64url) is followed by `.` and its proof, so that the service knows it
    issued it."""
    body = json.dumps({"v": CURSOR_VERSION, "list": listing, "before": before_id}, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(_proof(body))}"


def decode_cursor(listing: str, cursor: str) -> int:
    """The id a cursor of `listing` points below; a 422 naming `cursor` for anything else: a cursor without
    the service's proof (edited in any way, made up, truncated, issued before a change of the secret key or
    by another deployment), or one of another list."""
    try:
        body, _, proof = cursor.partition(".")
        raw = _unb64(body)
        valid = hmac.compare_digest(_unb64(proof), _proof(raw))
        if valid:
            payload = json.loads(raw)
            before = payload["before"]
            valid = (
                set(payload) == _FIELDS
                and payload["v"] == CURSOR_VERSION
                and payload["list"] == listing
                and type(before) is int
                and 1 <= before <= MAX_ID + 1
            )
    except (binascii.Error, ValueError, TypeError, KeyError, AttributeError):
        valid = False
    if not valid:
        raise ValidationFailed(
            "`cursor` is not a cursor of this list",
            {"cursor": [f"Not a cursor of {listing}: pass the `next_cursor` of a page of this list."]},
        )
    return before


def paginate(
    stmt: Select,
    key: ColumnElement[int],
    listing: str,
    page_size: int,
    page: int | None = None,
    cursor: str | None = None,
) -> dict:
    """One page of `stmt` (filtered, not ordered), newest first by `key` (the listed table's id): by
    `cursor` when given, else numbered page `page` (default 1). Returns the response envelope."""
    ordered = stmt.order_by(key.desc())
    if cursor is not None:
        ordered = ordered.where(key < decode_cursor(listing, cursor))
        total = None
    else:
        page = page or 1
        total = db.session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
        ordered = ordered.offset((page - 1) * page_size)
    # One row more than the page tells whether a page follows without counting.
    rows = db.session.scalars(ordered.limit(page_size + 1)).all()
    more = len(rows) > page_size
    rows = rows[:page_size]
    return {
        "data": rows,
        "pagination": {
            "page": None if cursor is not None else page,
            "page_size": page_size,
            "total": total,
            "total_pages": None if total is None else -(-total // page_size),
            "next_cursor": encode_cursor(listing, rows[-1].id) if more else None,
        },
    }
