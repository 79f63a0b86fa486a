"""A campaign's messages as CSV (`GET /campaigns/{id}/messages.csv`), streamed in chunks with flat memory.

On PostgreSQL the database writes the CSV itself: one `COPY (SELECT ...) TO STDOUT` on a connection of the
pool held for the length of the stream, read block by block. One statement is one snapshot of the campaign,
and the rows never become Python objects (over 50,000 rows a second; docs/benchmarks.md). On SQLite (local
runs, the fast tests) the same SELECT is fetched in batches and formatted in Python to the same bytes.
Text cells a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) get a `'` before them,
in the SELECT that both paths share; a phone (E.164) keeps its `+`.

The campaign is looked up and the first chunk fetched before the response starts, so a bad request or a
database that fails answers a JSON error like any other request. When the client goes away, the WSGI server
closes the response's iterator: the COPY is cancelled on the server and the connection rolled back and
returned to the pool (discarded when it cannot be). An error after the first chunk cuts the response short
(no final chunk); a client sees an incomplete download, never a CSV that looks complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterable, Iterator
from datetime import datetime

from flask import current_app
from sqlalchemy import Select, case, func, literal, literal_column, select
from sqlalchemy.engine import Engine

from app.campaigns.service import get_campaign
from app.database import DEADLINE_MARGIN, DeadlineConnection, describe
from app.extensions import db
from app.models import Campaign, Customer, OutboundMessage, UTCDateTime, message_channel

log = logging.getLogger(__name__)

# The file's columns, in order: its header, and what each holds. Both paths select exactly these.
COLUMNS = (
    ("message_id", OutboundMessage.id),
    ("customer_id", OutboundMessage.customer_id),
    ("phone", Customer.phone),  # empty when the customer is gone
    ("status", OutboundMessage.status),
    ("error_code", OutboundMessage.error_code),
    ("error", OutboundMessage.last_error),
    ("retry_count", OutboundMessage.retry_count),
    ("provider_message_id", OutboundMessage.provider_message_id),
    ("created_at", OutboundMessage.created_at),
    ("not_before", OutboundMessage.not_before),
    ("sent_at", OutboundMessage.sent_at),
    ("delivered_at", OutboundMessage.delivered_at),
    ("read_at", OutboundMessage.read_at),
    ("clicks", OutboundMessage.clicks),
    ("first_clicked_at", OutboundMessage.first_clicked_at),
    ("updated_at", OutboundMessage.updated_at),
    # Added after the rest, so that a reader of the earlier columns by position reads them still.
    ("channel", message_channel(OutboundMessage.fallback_for, Campaign.channel)),  # sms for a fallback
    ("fallback_for", OutboundMessage.fallback_for),  # a fallback: the WhatsApp message it replaces
    ("variant", OutboundMessage.variant),  # its A/B variant's name
)
HEADER = tuple(name for name, _ in COLUMNS)

# ISO 8601 in UTC with microseconds, fixed width: `2026-12-03T15:04:05.123456Z`.
PG_TIMESTAMP_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
# What the response's body is written in: chunks of about this many bytes (the COPY sends one row a message).
CHUNK_BYTES = 64 * 1024
# Rows fetched at a time on SQLite.
BATCH_ROWS = 500
# A cell that starts with one of these is a formula to a spreadsheet (Excel, LibreOffice, Google Sheets).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# The columns that hold text from outside the service (customers', providers'): the others are numbers,
# timestamps and statuses the service writes.
OUTSIDE_TEXT = frozenset({"phone", "error_code", "error", "provider_message_id"})
# A field is quoted when it holds one of these, as PostgreSQL's CSV does.
_NEEDS_QUOTES = re.compile('[,"\r\n]')
_SET_LOCAL_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"


def content_disposition(campaign_id: int) -> str:
    return f'attachment; filename="campaign-{campaign_id}-messages.csv"'


def campaign_csv(campaign_id: int, status: str | None = None) -> Iterable[bytes]:
    """The CSV of the campaign's messages (those in `status` only, when given), by message id, as an iterator
    of byte chunks whose first chunk is already fetched: an unknown campaign (404) or a failing database
    raises here, before any byte is sent. The iterator needs no request context; closing it ends the query."""
    get_campaign(campaign_id)
    # The session's read ends here and its connection goes back to the pool before the export takes one:
    # a request holds one connection, not two.
    db.session.rollback()
    engine = db.engine
    if engine.dialect.name == "postgresql":
        chunks = _copy_chunks(engine, campaign_id, status, current_app.config["EXPORT_STATEMENT_TIMEOUT"])
    else:
        chunks = _python_chunks(engine, campaign_id, status)
    return _Prefetched(chunks)


def export_statement(campaign_id: int, status: str | None, timestamps_in_sql: bool) -> Select:
    """The SELECT of `COLUMNS`, messages by id, the cells that hold text from outside neutralised (`_inert`)
    in the statement itself, so that both paths write them alike. With `timestamps_in_sql` (PostgreSQL) the
    timestamps come as text already; otherwise as datetimes that `format_row` writes the same way."""
    columns = []
    for name, column in COLUMNS:
        if name in OUTSIDE_TEXT:
            column = _inert(column, keep_plus=name == "phone")
        elif timestamps_in_sql and isinstance(column.type, UTCDateTime):
            column = _as_text(column)
        columns.append(column.label(name))
    stmt = (
        select(*columns)
        .select_from(OutboundMessage)
        .outerjoin(Customer, Customer.id == OutboundMessage.customer_id)
        .join(Campaign, Campaign.id == OutboundMessage.campaign_id)
        .where(OutboundMessage.campaign_id == campaign_id)
        .order_by(OutboundMessage.id)
    )
    if status is not None:
        stmt = stmt.where(OutboundMessage.status == status)
    return stmt


def _inert(column, keep_plus: bool = False):
    """A text column as a cell no spreadsheet runs (OWASP's rule against CSV injection): a value that starts
    with one of `FORMULA_STARTS` gets a `'` before it; with `keep_plus` (the phone, stored in E.164 by every
    write) a leading `+` is kept. The starts are SQL constants: the COPY's statement carries no parameter
    for them."""
    starts = [literal_column(f"'{start}'") for start in FORMULA_STARTS if not (keep_plus and start == "+")]
    return case((func.substr(column, 1, 1).in_(starts), literal("'") + column), else_=column)


def _as_text(column):
    """A timestamp column as `PG_TIMESTAMP_FORMAT` text, in UTC whatever the session's time zone."""
    return func.to_char(func.timezone("UTC", column), PG_TIMESTAMP_FORMAT)


# --- PostgreSQL: COPY ---------------------------------------------------------------------------------------


def copy_statement(engine: Engine, campaign_id: int, status: str | None) -> tuple[str, dict]:
    """The `COPY ... TO STDOUT` of the export, and its parameters (psycopg merges them client side)."""
    compiled = export_statement(campaign_id, status, timestamps_in_sql=True).compile(dialect=engine.dialect)
    sql = f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv, HEADER, ENCODING 'UTF8')"
    return sql, compiled.params


def _copy_chunks(engine: Engine, campaign_id: int, status: str | None, seconds: float) -> Generator[bytes, None, None]:
    """The COPY's output in chunks, on a pooled connection held until the iterator ends or is closed.

    The export has its own time limit, `seconds` (0: none), in place of the statement timeout of every other
    request: a million rows take longer than that, and a slow client makes the statement longer still. If the
    iterator is closed early, leaving the `copy` block cancels the COPY on the server and reads what it had
    already sent; the transaction is then rolled back and the connection returned to the pool."""
    sql, params = copy_statement(engine, campaign_id, status)
    pooled = engine.raw_connection()
    connection = pooled.driver_connection
    own_deadline = connection.deadline if isinstance(connection, DeadlineConnection) else None
    try:
        if isinstance(connection, DeadlineConnection):
            connection.deadline = seconds + DEADLINE_MARGIN if seconds else None
        with connection.cursor() as cursor:
            cursor.execute(_SET_LOCAL_STATEMENT_TIMEOUT, (f"{round(seconds * 1000)}ms",))
            with cursor.copy(sql, params) as copy:
                yield from _in_chunks(copy)
    except Exception as exc:
        log.warning("CSV export of campaign %s failed", campaign_id, extra={"error": describe(exc)})
        raise
    finally:
        if isinstance(connection, DeadlineConnection):
            connection.deadline = own_deadline
        _release(pooled)


def _release(pooled) -> None:
    """Return the export's connection to the pool after a rollback (which also ends its `SET LOCAL`), or
    discard it when it is closed or the rollback fails: its state is then unknown."""
    try:
        if pooled.driver_connection.closed:
            raise ConnectionError("connection closed")
        pooled.rollback()
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the connection must not be reused
        log.warning("CSV export: connection discarded", extra={"error": describe(exc)})
        pooled.invalidate()
        return
    pooled.close()


# --- SQLite (and any other database): the same bytes from Python ---------------------------------------------


def _python_chunks(engine: Engine, campaign_id: int, status: str | None) -> Generator[bytes, None, None]:
    """The CSV in chunks from a SELECT fetched `BATCH_ROWS` rows at a time, on a connection of its own."""
    stmt = export_statement(campaign_id, status, timestamps_in_sql=False)
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(stmt)
        yield from _in_chunks(_python_lines(result.partitions()))


def _python_lines(batches: Iterable) -> Iterator[bytes]:
    """The header line, then one bytes object per batch of rows."""
    yield format_row(HEADER).encode()
    for rows in batches:
        yield "".join(map(format_row, rows)).encode()


def format_row(values) -> str:
    """One CSV line as PostgreSQL's `COPY ... (FORMAT csv)` writes it: fields quoted only when they hold a
    comma, a quote, CR or LF (quotes doubled), an empty string quoted and a NULL left empty, LF at the end.
    Python's `csv` module differs twice: it leaves a lone CR unquoted under an LF line end, and writes an
    empty string and a NULL alike."""
    return ",".join(map(_field, values)) + "\n"


def _field(value) -> str:
    if value is None:
        return ""
    text = _timestamp(value) if isinstance(value, datetime) else str(value)
    if text == "":
        return '""'
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def _timestamp(value: datetime) -> str:
    """`PG_TIMESTAMP_FORMAT` in Python (values come from `UTCDateTime`: aware, in UTC)."""
    return value.replace(tzinfo=None).isoformat(sep="T", timespec="microseconds") + "Z"


# --- chunks --------------------------------------------------------------------------------------------------


def _in_chunks(blocks: Iterable, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`blocks` (bytes-like) regrouped into chunks of at least `size` bytes (the last one shorter): one write
    to the client per chunk, not one per row."""
    buffer = bytearray()
    for block in blocks:
        buffer += block
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


class _Prefetched:
    """`chunks` with its first chunk fetched at once, so that what fails before the first byte raises in the
    view. Closing it closes `chunks` (ends the query, frees the connection), even if it was never iterated
    (a HEAD request)."""

    def __init__(self, chunks: Generator[bytes, None, None]):
        self._chunks = chunks
        self._first: bytes | None = next(chunks, None)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self._chunks)

    def close(self) -> None:
        self._first = None
        self._chunks.close()
