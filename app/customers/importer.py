"""Bulk import of customers from CSV: streamed, validated row by row, upserted by phone in batches.

Good rows are kept when some are bad; each bad row is reported with its line number and reason.
Memory stays flat whatever the file size: one batch of rows is held at a time.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.customers.phones import InvalidPhone, normalize_phone
from app.errors import ValidationFailed
from app.extensions import db
from app.models import Customer

COLUMNS = ("phone", "first_name", "last_name", "location", "preferred_product")
MAX_LENGTHS = {"first_name": 100, "last_name": 100, "location": 100, "preferred_product": 200, "phone": 32}
MAX_REPORTED_ERRORS = 1000


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


def _header(reader: Iterator[list[str]]) -> list[str]:
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ValidationFailed("the CSV file is empty; expected a header line: " + ",".join(COLUMNS)) from None
    unknown = [h for h in header if h not in COLUMNS]
    problems = []
    if "phone" not in header:
        problems.append("no phone column")
    if unknown:
        problems.append("unknown column(s) " + ", ".join(unknown))
    if len(set(header)) != len(header):
        problems.append("a column appears twice")
    if problems:
        raise ValidationFailed(f"CSV header: {'; '.join(problems)}; expected columns: {','.join(COLUMNS)}")
    return header


def _parse(header: list[str], values: list[str], region: str) -> dict:
    """One CSV row as customer fields; ValueError with the reason when it is not a valid customer."""
    if len(values) != len(header):
        raise ValueError(f"expected {len(header)} fields, found {len(values)}")
    row = {}
    for name, raw in zip(header, values, strict=True):
        value = raw.strip()
        if "\x00" in value or "\ufffd" in value:
            raise ValueError(f"{name}: not valid UTF-8 text")
        if len(value) > MAX_LENGTHS[name]:
            raise ValueError(f"{name}: longer than {MAX_LENGTHS[name]} characters")
        row[name] = value or None
    if not row.get("phone"):
        raise ValueError("phone: missing")
    try:
        row["phone"] = normalize_phone(row["phone"], region)
    except InvalidPhone as exc:
        raise ValueError(f"phone: {exc}") from None
    return row


def _upsert(batch: dict[str, dict], duplicates: int, report: ImportReport) -> None:
    """Insert or update `batch` (keyed by phone) in one statement, and count what it did."""
    existing = set(db.session.scalars(select(Customer.phone).where(Customer.phone.in_(list(batch)))))
    now = clock.now()
    rows = [{**{c: None for c in COLUMNS}, **row, "created_at": now, "updated_at": now} for row in batch.values()]
    dialect = db.session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Customer).values(rows)
    fields = [c for c in COLUMNS if c != "phone"]
    db.session.execute(
        insert.on_conflict_do_update(
            index_elements=["phone"],
            set_={**{c: insert.excluded[c] for c in fields}, "updated_at": insert.excluded.updated_at},
        )
    )
    db.session.commit()
    report.created += len(batch) - len(existing)
    report.updated += len(existing) + duplicates


def import_customers(lines: Iterable[str], progress: Callable[[int], None] | None = None) -> ImportReport:
    """Import customers from CSV text lines (header first). Rows are upserted by phone in batches of
    `IMPORT_BATCH_SIZE`, each committed; `progress(rows)` is called after each batch."""
    region = current_app.config["DEFAULT_PHONE_REGION"]
    batch_size = current_app.config["IMPORT_BATCH_SIZE"]
    reader = csv.reader(lines)
    header = _header(reader)
    report = ImportReport()
    batch: dict[str, dict] = {}
    duplicates = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the csv module's size limit
            report.reject(reader.line_num, f"not a CSV row: {exc}")
            continue
        if not any(v.strip() for v in values):
            continue  # blank line
        try:
            row = _parse(header, values, region)
        except ValueError as exc:
            report.reject(reader.line_num, str(exc))
            continue
        if row["phone"] in batch:
            duplicates += 1  # a later line for the same phone wins
        batch[row["phone"]] = row
        if len(batch) >= batch_size:
            _upsert(batch, duplicates, report)
            if progress:
                progress(len(batch) + duplicates)
            batch, duplicates = {}, 0
    if batch:
        _upsert(batch, duplicates, report)
        if progress:
            progress(len(batch) + duplicates)
    return report
