"""Applying what waited in Redis while PostgreSQL was unavailable (`app.messaging.spool`): a send's record,
receipts, customers' keywords."""

from __future__ import annotations

from flask import current_app

from app.customers import optouts
from app.messaging import receipts, spool
from app.messaging.send import job
from app.queues import get_redis


def apply(item: dict) -> None:
    """Apply one spooled item in its own transactions; raises what the database raises."""
    if "record" in item:
        job.apply_kept_outcome(item["record"], item.get("after") or {})
    elif "receipts" in item:
        receipts.record([receipts.Receipt(**fields) for fields in item["receipts"]])
    elif "keyword" in item:
        keyword = item["keyword"]
        optouts.apply_by_phone(keyword["phone"], keyword["channel"], keyword["action"], keyword["source"])


def drain() -> int:
    """Apply now what waits (the reconciler does, before it releases any claim); how many items."""
    return spool.drain(get_redis(), apply)


def drainer() -> spool.Drainer:
    """The thread that drains every second in a worker process (not started)."""
    app = current_app._get_current_object()
    return spool.Drainer(app, get_redis(), apply)
