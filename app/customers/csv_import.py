"""Bulk import of customers from CSV: read through a capped line source, validated row by row, upserted
by phone in batches.

What an import writes:
- only the columns the header names: a column the file does not have is left as it is;
- an empty cell keeps the stored value (a new customer gets null); a field is cleared with PATCH;
- lines for the same phone merge the same way: a later non-empty value wins;
- the optional `opted_out_sms` and `opted_out_whatsapp` columns opt the customer out of that channel
  (`true`, `1`, `yes`; source `import`, a customer already opted out keeps their first time and source) or
  back in (`false`, `0`, `no`); empty keeps their opt-out as it is;
- every other column is an attribute (app.customers.attributes), its header the key, perhaps typed
  (`spend:number`, `vip:boolean`, `last_order:date`; untyped is text); its cell sets that attribute, an empty
  cell removes it, and attributes the file does not name are kept.

Good rows are kept when some are bad; a bad row is reported with the line its record began on. Memory
stays flat whatever the file: one batch of rows is held, and no record longer than `MAX_RECORD_BYTES`.
A batch's rows are written in phone order, so concurrent imports take row locks in the same order and
cannot deadlock; on PostgreSQL the upsert itself says which rows it inserted, so counts stay exact
when imports overlap.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import IO

from flask import current_app
from sqlalchemy import String, bindparam, func, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError

from app import clock
from app.customers import attributes, optouts
from app.customers.phones import InvalidPhone, country_of, normalize_phone
from app.errors import ValidationFailed
from app.extensions import db
from app.models import Channel, Customer, JsonObject, OptOutSource
from app.text import text_problem

log = logging.getLogger(__name__)

COLUMNS = ("phone", "first_name", "last_name", "location", "preferred_product")
# Optional columns that set the customer's opt-out of a channel rather than a field of theirs.
OPT_OUT_COLUMNS = {"opted_out_sms": Channel.SMS, "opted_out_whatsapp": Channel.WHATSAPP}
ALL_COLUMNS = (*COLUMNS, *OPT_OUT_COLUMNS)
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
MAX_LENGTHS = {
    "first_name": 100,
    "last_name": 100,
    "location": 100,
    "preferred_product": 200,
    "phone": 32,
    "opted_out_sms": 5,
    "opted_out_whatsapp": 5,
}
ATTRIBUTE_TYPES = ("text", "number", "boolean", "date")
MAX_REPORTED_ERRORS = 1000
# The longest record a valid row needs, with room to spare: every column at its limit in 4-byte UTF-8
# characters, each doubled by CSV quoting, with its quotes and comma, and the attributes' 8 KB (UTF-8 bytes)
# doubled by quoting, with theirs; twice that for padding.
MAX_RECORD_BYTES = 2 * (
    sum(2 * 4 * n + 3 for n in MAX_LENGTHS.values()) + 2 * attributes.MAX_BYTES + 3 * attributes.MAX_KEYS
)
# A 422 for unknown header columns names this many of them, each cut to MAX_LISTED_NAME characters.
MAX_LISTED_COLUMNS = 10
MAX_LISTED_NAME = 40
UTF8_BOM = b"\xef\xbb\xbf"
# Reading past an over-long line, this much at a time.
_SKIP_BYTES = 64 * 1024

_customers = Customer.__table__


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    invalid: int = 0
    errors: list[dict] = field(default_factory=list)
    errors_truncated: bool = False

    def reject(self, line: int, reason: str) -> None:
        self.invalid += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "reason": reason})
        else:
            self.errors_truncated = True


class RecordTooLong(Exception):
    """A record ran over MAX_RECORD_BYTES; the rest of its physical line has been read and dropped."""


class LineSource:
    """The physical lines of a binary CSV stream, decoded (UTF-8; a byte that is not becomes U+FFFD),
    for `csv.reader`. It counts the lines and bytes consumed, so a record's first line and the place
    where a batch ends are known, and caps each record at `limit` bytes: the rest of an over-long line
    is read and dropped in pieces, never held, and `RecordTooLong` is raised through the reader, which
    starts afresh on the next line at its next call."""

    def __init__(self, stream: IO[bytes], line: int = 0, offset: int = 0, limit: int = MAX_RECORD_BYTES):
        self.stream = stream
        self.line = line  # lines consumed
        self.offset = offset  # bytes consumed
        self.limit = limit
        self._record_bytes = 0

    def start_record(self) -> int:
        """Mark the start of a record; returns the number of its first line."""
        self._record_bytes = 0
        return self.line + 1

    def __iter__(self) -> LineSource:
        return self

    def __next__(self) -> str:
        room = self.limit - self._record_bytes
        raw = self.stream.readline(room + 1)
        if not raw:
            raise StopIteration
        at_start = self.offset == 0
        self.line += 1
        self.offset += len(raw)
        if len(raw) > room:
            self._skip_rest(raw)
            raise RecordTooLong(f"row longer than {self.limit} bytes")
        self._record_bytes += len(raw)
        if at_start and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        return raw.decode("utf-8", errors="replace")

    def _skip_rest(self, raw: bytes) -> None:
        while not raw.endswith(b"\n"):
            raw = self.stream.readline(_SKIP_BYTES)
            if not raw:
                return
            self.offset += len(raw)


def _listed(names: list[str]) -> str:
    shown = [n if len(n) <= MAX_LISTED_NAME else n[:MAX_LISTED_NAME] + "..." for n in names[:MAX_LISTED_COLUMNS]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more:,} more" if more else "")


@dataclass(frozen=True)
class Header:
    """The file's columns in order: built-in fields and opt-out columns by name, attributes as
    `attributes.KEY`, each attribute with its type (`types`)."""

    columns: tuple[str, ...]
    types: dict[str, str] = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        """The customer columns an upsert writes."""
        return tuple(c for c in self.columns if c in COLUMNS)

    @property
    def has_attributes(self) -> bool:
        return bool(self.types)


def _attribute_column(name: str) -> tuple[str, str]:
    """(`attributes.KEY`, type) of a header name that is no built-in column; ValueError when it cannot be."""
    key, _, kind = name.partition(":")
    key, kind = key.strip(), kind.strip() or "text"
    if attributes.key_problem(key):
        raise ValueError(name)
    if kind not in ATTRIBUTE_TYPES:
        raise ValueError(name)
    return f"attributes.{key}", kind


def read_header(source: LineSource) -> Header:
    """The columns of the header record; `ValidationFailed` (a 422) when it is missing, has no `phone`, a
    column that can be no attribute (its name or type), more attributes than a customer may have, or a
    column twice."""
    expected = (
        ",".join(COLUMNS)
        + " (optional: "
        + ", ".join(OPT_OUT_COLUMNS)
        + "; any other column is an attribute: name, name:number, name:boolean or name:date)"
    )
    source.start_record()
    try:
        header = [h.strip().lower() for h in next(csv.reader(source))]
    except StopIteration:
        raise ValidationFailed("the CSV file is empty; expected a header line: " + expected) from None
    except RecordTooLong:
        raise ValidationFailed(f"CSV header: longer than {source.limit} bytes; expected columns: {expected}") from None
    except csv.Error as exc:
        raise ValidationFailed(f"CSV header: not CSV ({exc}); expected columns: {expected}") from None
    columns: list[str] = []
    types: dict[str, str] = {}
    bad = []
    for name in header:
        if name in ALL_COLUMNS:
            columns.append(name)
            continue
        try:
            column, kind = _attribute_column(name)
        except ValueError:
            bad.append(name)
            continue
        columns.append(column)
        types[column] = kind
    problems = []
    if "phone" not in columns:
        problems.append("no phone column")
    if bad:
        problems.append(
            "column(s) that can be no attribute (a name is a lower-case letter, then up to 39 lower-case "
            "letters, digits or _; a type is number, boolean or date) " + _listed(bad)
        )
    elif len(types) > attributes.MAX_KEYS:
        problems.append(f"{len(types):,} attribute columns, over the limit of {attributes.MAX_KEYS}")
    if len(set(columns)) != len(columns):
        problems.append("a column appears twice")
    if problems:
        raise ValidationFailed(f"CSV header: {'; '.join(problems)}; expected columns: {expected}")
    return Header(tuple(columns), types)


def _is_blank(values: list[str]) -> bool:
    """An empty line, or one of nothing but spaces; `,,` is a row (of empty fields)."""
    return not values or (len(values) == 1 and not values[0].strip())


def _typed(column: str, kind: str, value: str) -> str | float | int | bool | None:
    """An attribute cell as its value (None for an empty cell: the attribute is removed)."""
    name = column.removeprefix("attributes.")
    if not value:
        return None
    shown = value if len(value) <= MAX_LISTED_NAME else value[:MAX_LISTED_NAME] + "..."
    if kind == "number":
        try:
            number = int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"{name}: {shown!r} is not a number") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{name}: {shown!r} is not a finite number")
        return number
    if kind == "boolean":
        word = value.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{name}: {shown!r} is not one of true/false, 1/0, yes/no (or empty)")
    if kind == "date":
        try:
            day = date.fromisoformat(value) if len(value) == 10 else None
        except ValueError:
            day = None
        if day is None:
            raise ValueError(f"{name}: {shown!r} is not a date (YYYY-MM-DD)")
        return day.isoformat()
    if len(value) > attributes.MAX_VALUE_LENGTH:
        raise ValueError(f"{name}: longer than {attributes.MAX_VALUE_LENGTH} characters")
    return value


def _parse(header: Header, values: list[str], region: str) -> dict:
    """One CSV row as customer fields (an empty cell is None), its attributes under `attributes` (an empty
    cell is None: removed); ValueError with the reason when it is not a valid customer."""
    if len(values) != len(header.columns):
        raise ValueError(f"expected {len(header.columns)} fields, found {len(values)}")
    row: dict = {"attributes": {}} if header.has_attributes else {}
    for name, raw in zip(header.columns, values, strict=True):
        value = raw.strip()
        if "\ufffd" in value:
            raise ValueError(f"{name.removeprefix('attributes.')}: not valid UTF-8 text")
        problem = text_problem(value)
        if problem:
            raise ValueError(f"{name.removeprefix('attributes.')}: {problem}")
        if name in OPT_OUT_COLUMNS:
            row[name] = _flag(name, value)
            continue
        if name in header.types:
            row["attributes"][name.removeprefix("attributes.")] = _typed(name, header.types[name], value)
            continue
        if len(value) > MAX_LENGTHS[name]:
            raise ValueError(f"{name}: longer than {MAX_LENGTHS[name]} characters")
        row[name] = value or None
    if not row["phone"]:
        raise ValueError("phone: missing")
    try:
        row["phone"] = normalize_phone(row["phone"], region)
    except InvalidPhone as exc:
        raise ValueError(f"phone: {exc}") from None
    row["country"] = country_of(row["phone"])
    return row


def _flag(name: str, value: str) -> bool | None:
    """An opt-out cell: True (opt out), False (opt back in), None (empty: keep as it is)."""
    word = value.lower()
    if not word:
        return None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    shown = value if len(value) <= MAX_LISTED_NAME else value[:MAX_LISTED_NAME] + "..."
    raise ValueError(f"{name}: {shown!r} is not one of true/false, 1/0, yes/no (or empty)")


@dataclass
class Batch:
    """Rows read since the last batch, merged by phone, and where in the file the batch ends."""

    rows: dict[str, dict] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # phone -> line of its last record
    repeats: dict[str, int] = field(default_factory=dict)  # phone -> later lines merged into its row
    end_offset: int = 0
    end_line: int = 0
    last: bool = False

    def add(self, row: dict, line: int) -> None:
        phone = row["phone"]
        held = self.rows.get(phone)
        if held is None:
            self.rows[phone] = row
        else:
            held.update((name, value) for name, value in row.items() if value is not None and name != "attributes")
            if "attributes" in row:
                held["attributes"].update((k, v) for k, v in row["attributes"].items() if v is not None)
            self.repeats[phone] = self.repeats.get(phone, 0) + 1
        self.lines[phone] = line


def read_batches(source: LineSource, header: Header, report: ImportReport) -> Iterator[Batch]:
    """The records after the header, in batches of `IMPORT_BATCH_SIZE` records (good or bad; blank
    lines do not count). Bad records go to `report` as they are read. The last batch, `last` and
    perhaps empty, ends at the end of the file."""
    region = current_app.config["DEFAULT_PHONE_REGION"]
    batch_size = current_app.config["IMPORT_BATCH_SIZE"]
    reader = csv.reader(source)
    batch, records = Batch(), 0
    while True:
        line = source.start_record()
        try:
            values = next(reader)
        except StopIteration:
            break
        except RecordTooLong as exc:
            report.reject(line, str(exc))
        except csv.Error as exc:
            report.reject(line, f"not a CSV row: {exc}")
        else:
            if _is_blank(values):
                continue
            try:
                batch.add(_parse(header, values, region), line)
            except ValueError as exc:
                report.reject(line, str(exc))
        records += 1
        if records >= batch_size:
            batch.end_offset, batch.end_line = source.offset, source.line
            yield batch
            batch, records = Batch(), 0
    batch.end_offset, batch.end_line, batch.last = source.offset, source.line, True
    yield batch


@lru_cache(maxsize=64)
def _upsert_statement(columns: tuple[str, ...], dialect: str):
    """Upsert `columns` by phone; a NULL (an empty cell) keeps the stored value.

    On PostgreSQL one INSERT ... SELECT from `unnest` of one array per column, in phone order, which
    returns per row whether it was inserted (`xmax = 0`): the statement is the same whatever the batch
    size (the driver parses a VALUES list of 1,000 rows anew for every batch, and that cost more than
    everything else). On SQLite a plain executemany."""
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_customers)
    if dialect == "postgresql":
        rows = (
            func.unnest(*[bindparam(c, type_=postgresql.ARRAY(String)) for c in columns])
            .table_valued(*columns)
            .render_derived(name="rows")
        )
        now = bindparam("now", type_=_customers.c.created_at.type)
        insert = insert.from_select(
            [*columns, "created_at", "updated_at"],
            select(*[rows.c[c] for c in columns], now, now).order_by(rows.c.phone),
        )
    changes = {c: func.coalesce(insert.excluded[c], _customers.c[c]) for c in columns if c != "phone"}
    stmt = insert.on_conflict_do_update(
        index_elements=["phone"], set_={**changes, "updated_at": insert.excluded.updated_at}
    )
    return stmt.returning(literal_column("xmax = 0")) if dialect == "postgresql" else stmt


def _upsert(rows: list[dict], columns: tuple[str, ...]) -> int:
    """Upsert `rows` in phone order; returns how many were inserted."""
    now = clock.now()
    dialect = db.session.get_bind().dialect.name
    stmt = _upsert_statement(columns, dialect)
    if dialect == "postgresql":
        arrays = {c: [row[c] for row in rows] for c in columns}
        return sum(db.session.execute(stmt, {**arrays, "now": now}).scalars())
    # SQLite has one writer at a time: a read before the write counts exactly.
    existing = db.session.scalar(select(func.count()).where(_customers.c.phone.in_([row["phone"] for row in rows])))
    db.session.execute(stmt, [{**{c: row[c] for c in columns}, "created_at": now, "updated_at": now} for row in rows])
    return len(rows) - existing


def _write_opt_outs(rows: list[dict], header: Header) -> None:
    """The opt-out columns of written rows: opt out or back in by phone, in the caller's transaction."""
    for column in (c for c in header.columns if c in OPT_OUT_COLUMNS):
        flagged = {True: [], False: []}
        for row in rows:
            if row.get(column) is not None:
                flagged[row[column]].append(row["phone"])
        for value, phones in flagged.items():
            if not phones:
                continue
            ids = db.session.scalars(select(Customer.id).where(Customer.phone.in_(phones))).all()
            channel = OPT_OUT_COLUMNS[column]
            if value:
                optouts.opt_out_ids(ids, channel, OptOutSource.IMPORT)
            else:
                optouts.opt_in_ids(ids, channel)


def _merge_attributes(batch: Batch, phones: list[str], report: ImportReport) -> list[str]:
    """Each row's attributes merged into its customer's stored ones (`merged_attributes`), read under row
    locks taken in phone order (as the upsert takes them); a row whose merged attributes are over the limits
    is reported and dropped. Returns the phones kept."""
    stored = dict(
        db.session.execute(
            select(Customer.phone, Customer.attributes)
            .where(Customer.phone.in_(phones))
            .order_by(Customer.phone)
            .with_for_update()
        ).all()
    )
    kept = []
    for phone in phones:
        row = batch.rows[phone]
        merged = attributes.merged(stored.get(phone), row["attributes"])
        problem = attributes.size_problem(merged)
        if problem:
            report.reject(batch.lines[phone], f"attributes: {problem}")
            continue
        row["merged_attributes"] = merged
        kept.append(phone)
    return kept


def _write_attributes(rows: list[dict]) -> None:
    """Store each written row's merged attributes, by phone, in phone order."""
    if db.session.get_bind().dialect.name == "postgresql":
        given = (
            func.unnest(
                bindparam("phones", type_=postgresql.ARRAY(String)),
                bindparam("attrs", type_=postgresql.ARRAY(postgresql.JSONB)),
            )
            .table_valued("phone", "attrs")
            .render_derived(name="given")
        )
        db.session.execute(
            update(_customers).values(attributes=given.c.attrs).where(_customers.c.phone == given.c.phone),
            {"phones": [r["phone"] for r in rows], "attrs": [r["merged_attributes"] for r in rows]},
        )
        return
    stmt = (
        update(_customers)
        .where(_customers.c.phone == bindparam("p"))
        .values(attributes=bindparam("a", type_=JsonObject))
    )
    db.session.execute(stmt, [{"p": r["phone"], "a": r["merged_attributes"]} for r in rows])


def write_batch(batch: Batch, header: Header, report: ImportReport) -> None:
    """Upsert the batch's rows in the caller's transaction, in phone order, and count them in `report`;
    then apply their attributes and opt-out columns.

    If the database refuses the batch, its rows are written one by one, each in a savepoint, so that a
    refused row costs only itself; it is reported with its line."""
    phones = sorted(batch.rows)
    if header.has_attributes and phones:
        phones = _merge_attributes(batch, phones, report)
    if not phones:
        return
    columns = (*header.fields, "country")
    try:
        with db.session.begin_nested():
            created = _upsert([batch.rows[p] for p in phones], columns)
        written = phones
    except (DataError, IntegrityError):
        created, written = 0, []
        for phone in phones:
            try:
                with db.session.begin_nested():
                    created += _upsert([batch.rows[phone]], columns)
                written.append(phone)
            except (DataError, IntegrityError):
                log.warning("the database refused an imported row", extra={"line": batch.lines[phone]}, exc_info=True)
                report.reject(batch.lines[phone], "the database refused this row")
    report.created += created
    report.updated += len(written) - created + sum(batch.repeats.get(p, 0) for p in written)
    if header.has_attributes and written:
        _write_attributes([batch.rows[p] for p in written])
    _write_opt_outs([batch.rows[p] for p in written], header)


def import_customers(stream: IO[bytes], progress: Callable[[int], None] | None = None) -> ImportReport:
    """Import customers from a binary CSV stream (header first), committing each batch;
    `progress(bytes)` is called after each commit with the bytes read so far."""
    source = LineSource(stream)
    header = read_header(source)
    report = ImportReport()
    for batch in read_batches(source, header, report):
        write_batch(batch, header, report)
        db.session.commit()
        if progress:
            progress(batch.end_offset)
    return report
