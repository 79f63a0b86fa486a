"""A campaign's progress: how many of its messages are in each status, read cheaply at any size.

On PostgreSQL the database keeps the counts (migration 0011). Triggers on `outbound_messages` append each
statement's net change per campaign and status to `campaign_message_count_changes`; `fold` moves those
changes into `campaign_message_counts` in one transaction, a batch at a time (workers run it every
`STATS_FOLD_INTERVAL` seconds). A read sums both tables in one statement, so it sees every committed
change exactly once whether or not it was folded yet, and costs a few rows per campaign however many
messages the campaign has. When a campaign ends, `recount` replaces its counts with a count of its rows.

On SQLite (tests, a local run) there are no triggers: the stats count the rows, which is cheap there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flask import Flask, current_app
from sqlalchemy import Select, and_, bindparam, case, func, literal, select, text, union_all
from sqlalchemy.orm import aliased

from app import clock
from app.database import statement_budget
from app.extensions import db
from app.models import CampaignMessageCount, CampaignMessageCountChange, MessageStatus, OutboundMessage
from app.periodic import Periodic

log = logging.getLogger(__name__)

# The one lock folds and recounts take (pg_advisory_xact_lock): one of them at a time, so that a change is
# moved into the counts once and a recount is never overwritten by an older fold.
FOLD_LOCK = 7_310_001
# Changes moved per fold transaction: bounded, so that a backlog (workers stopped while receipts came in)
# is worked off in short transactions.
FOLD_BATCH = 50_000

# In one statement: what a fold deletes is exactly what it adds (its snapshot), and a change committed
# meanwhile stays for the next fold. Summed in the order of the counts' key, so that two writers of the
# counts (a fold and a recount wait for the same lock anyway) would lock rows in one order.
_FOLD = text(
    """
    WITH moved AS (
        DELETE FROM campaign_message_count_changes
        WHERE id IN (SELECT id FROM campaign_message_count_changes ORDER BY id LIMIT :batch)
        RETURNING campaign_id, status, messages, read, segments, clicked, clicks
    ), summed AS (
        SELECT campaign_id, status, sum(messages) AS messages, sum(read) AS read, sum(segments) AS segments,
               sum(clicked) AS clicked, sum(clicks) AS clicks, count(*) AS changes
        FROM moved GROUP BY campaign_id, status
    ), added AS (
        INSERT INTO campaign_message_counts AS c (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, status, messages, read, segments, clicked, clicks FROM summed
        ORDER BY campaign_id, status
        ON CONFLICT (campaign_id, status) DO UPDATE
        SET messages = c.messages + excluded.messages, read = c.read + excluded.read,
            segments = c.segments + excluded.segments, clicked = c.clicked + excluded.clicked,
            clicks = c.clicks + excluded.clicks
    )
    SELECT coalesce(sum(changes), 0) FROM summed
    """
)

# The key a message is counted under: its status; `v:<variant>:<status>` for a message of an A/B variant
# (app.messaging.variants); for an SMS fallback (`fallback_for`) `f:` and its status, or `f:opted_out` /
# `f:frequency_cap` for one skipped for that reason (app.messaging.fallback). Migration 0019's trigger
# computes the same.
FALLBACK_PREFIX = "f:"
VARIANT_PREFIX = "v:"
SKIPPED_FALLBACKS = ("opted_out", "frequency_cap")
KEY = (
    "CASE WHEN fallback_for IS NULL AND variant IS NULL THEN status"
    " WHEN fallback_for IS NULL THEN 'v:' || variant || ':' || status"
    " WHEN status = 'canceled' AND error_code IN ('opted_out', 'frequency_cap') THEN 'f:' || error_code"
    " ELSE 'f:' || status END"
)
_OWN = OutboundMessage.fallback_for.is_(None)
COUNT_KEY = case(
    (and_(_OWN, OutboundMessage.variant.is_(None)), OutboundMessage.status),
    (_OWN, literal(VARIANT_PREFIX) + OutboundMessage.variant + literal(":") + OutboundMessage.status),
    (
        and_(OutboundMessage.status == MessageStatus.CANCELED, OutboundMessage.error_code.in_(SKIPPED_FALLBACKS)),
        literal(FALLBACK_PREFIX) + OutboundMessage.error_code,
    ),
    else_=literal(FALLBACK_PREFIX) + OutboundMessage.status,
)

# In one statement, so that the count and the changes it drops share one snapshot: a change committed
# after it (a receipt arriving meanwhile) is in neither, and stays to be added.
_RECOUNT = text(
    f"""
    WITH dropped AS (
        DELETE FROM campaign_message_count_changes WHERE campaign_id = :campaign_id
    ), fresh AS (
        SELECT {KEY} AS status, count(*) AS messages, count(read_at) AS read,
               coalesce(sum(segments), 0) AS segments, count(first_clicked_at) AS clicked,
               coalesce(sum(clicks), 0) AS clicks
        FROM outbound_messages WHERE campaign_id = :campaign_id GROUP BY 1
    ), stale AS (
        DELETE FROM campaign_message_counts
        WHERE campaign_id = :campaign_id AND status NOT IN (SELECT status FROM fresh)
    )
    INSERT INTO campaign_message_counts AS c (campaign_id, status, messages, read, segments, clicked, clicks)
    SELECT :campaign_id, status, messages, read, segments, clicked, clicks FROM fresh ORDER BY status
    ON CONFLICT (campaign_id, status) DO UPDATE
    SET messages = excluded.messages, read = excluded.read, segments = excluded.segments,
        clicked = excluded.clicked, clicks = excluded.clicks
    """
)


def counted_by_database() -> bool:
    """Whether the database keeps the counts (PostgreSQL, with migration 0011's triggers)."""
    return db.engine.dialect.name == "postgresql"


def counts_query(campaign_ids: Iterable[int]) -> Select:
    """Per campaign and status: messages, read, segments, clicked, clicks. On PostgreSQL from the kept counts plus the
    changes not folded yet; elsewhere from the rows."""
    statement = _KEPT_COUNTS if counted_by_database() else _ROW_COUNTS
    return statement.params(campaign_ids=list(campaign_ids))


def rows_query(campaign_ids: Iterable[int]) -> Select:
    """The same figures counted from the messages themselves: one pass over the campaigns' rows. What
    SQLite reads, what a recount stores, and what the tests compare the kept counts with."""
    return _ROW_COUNTS.params(campaign_ids=list(campaign_ids))


# Built once (stats are read on every campaign request): the ids are one expanding parameter.
_IDS = bindparam("campaign_ids", expanding=True)
_ROW_COUNTS = (
    select(
        OutboundMessage.campaign_id,
        COUNT_KEY.label("status"),
        func.count(),
        func.count(OutboundMessage.read_at),
        func.coalesce(func.sum(OutboundMessage.segments), 0),
        func.count(OutboundMessage.first_clicked_at),
        func.coalesce(func.sum(OutboundMessage.clicks), 0),
    )
    .where(OutboundMessage.campaign_id.in_(_IDS))
    .group_by(OutboundMessage.campaign_id, COUNT_KEY)
)
_BOTH = union_all(
    *(
        select(t.campaign_id, t.status, t.messages, t.read, t.segments, t.clicked, t.clicks).where(
            t.campaign_id.in_(_IDS)
        )
        for t in (CampaignMessageCount, CampaignMessageCountChange)
    )
).subquery()
_KEPT_COUNTS = select(
    _BOTH.c.campaign_id,
    _BOTH.c.status,
    func.sum(_BOTH.c.messages),
    func.sum(_BOTH.c.read),
    func.sum(_BOTH.c.segments),
    func.sum(_BOTH.c.clicked),
    func.sum(_BOTH.c.clicks),
).group_by(_BOTH.c.campaign_id, _BOTH.c.status)


def _no_messages() -> dict[str, int]:
    """Every status, read, clicks, total and segments at 0: a variant's counts, and the start of a campaign's."""
    return {status: 0 for status in MessageStatus.ALL} | {
        "read": 0,
        "clicked": 0,
        "clicks": 0,
        "total": 0,
        "segments_sent": 0,
    }


def _empty() -> dict[str, int]:
    return (
        _no_messages()
        | {f"fallback_{status}": 0 for status in MessageStatus.ALL}
        | {f"fallback_skipped_{reason}": 0 for reason in SKIPPED_FALLBACKS}
        | {"fallback_total": 0, "delivered_after_fallback": 0, "variants": {}}
    )


def _add(counts: dict, name: str, status: str, total: str, figures: tuple[int, int, int, int, int]) -> None:
    """Add one key's figures (messages, read, segments, clicked, clicks) to `counts`: its messages under
    `name` and `total`, the rest to read and clicks, and its segments when the provider accepted them."""
    messages, read, segments, clicked, clicks = figures
    counts[name] += messages
    counts[total] += messages
    counts["read"] += read
    counts["clicked"] += clicked
    counts["clicks"] += clicks
    if status in MessageStatus.ACCEPTED:
        counts["segments_sent"] += segments


def stats_from(rows: Iterable[tuple]) -> dict[int, dict[str, int]]:
    """`counts_query` or `rows_query` rows as each campaign's stats (without the held ones). The campaign's own
    messages are counted by status and in `total`, and per A/B variant in `variants` (by name); its SMS
    fallbacks apart (`fallback_<status>`, `fallback_skipped_<reason>`, `fallback_total`), their segments and
    clicks with the campaign's."""
    stats: dict[int, dict[str, int]] = {}
    for campaign_id, key, messages, read, segments, clicked, clicks in rows:
        campaign = stats.setdefault(campaign_id, _empty())
        figures = (int(messages), int(read), int(segments), int(clicked), int(clicks))
        if key.startswith(VARIANT_PREFIX):
            name, status = key.removeprefix(VARIANT_PREFIX).rsplit(":", 1)
            _add(campaign["variants"].setdefault(name, _no_messages()), status, status, "total", figures)
            _add(campaign, status, status, "total", figures)
        elif key.startswith(FALLBACK_PREFIX):
            status = key.removeprefix(FALLBACK_PREFIX)
            name = f"fallback_skipped_{status}" if status in SKIPPED_FALLBACKS else f"fallback_{status}"
            _add(campaign, name, status, "fallback_total", figures)
        else:
            _add(campaign, key, key, "total", figures)
    return stats


def stats_for(campaign_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Each campaign's stats: how many of its messages are in each status (each counted once, under its
    current one), `read` (delivered ones with `read_at`), `clicked` (messages whose links were clicked at
    least once) and `clicks` (all their clicks), `total`, `segments_sent` (the SMS segments of
    the messages a provider accepted: sent, delivered or undelivered; what the campaign is billed for) and
    `waiting_quiet_hours` and `held_by_provider` (pending messages held by quiet hours, or by the provider,
    until a time still ahead). Two queries
    for any number of campaigns; neither reads a campaign's messages one by one."""
    ids = list(dict.fromkeys(campaign_ids))
    if not ids:
        return {}
    counted = stats_from(db.session.execute(counts_query(ids)))
    stats = {campaign_id: counted.get(campaign_id, _empty()) for campaign_id in ids}
    for campaign in stats.values():
        campaign["waiting_quiet_hours"] = campaign["held_by_provider"] = 0
    # Asked only of campaigns with pending messages (a finished campaign's stats stay one query).
    waiting = [
        campaign_id for campaign_id in ids if stats[campaign_id]["pending"] or stats[campaign_id]["fallback_pending"]
    ]
    if waiting:
        for campaign_id, quiet_hours, provider in db.session.execute(waiting_quiet_hours_query(waiting)):
            stats[campaign_id]["waiting_quiet_hours"] = quiet_hours
            stats[campaign_id]["held_by_provider"] = provider
    # And only of campaigns whose fallbacks went out: how many of their WhatsApp messages were delivered too.
    fell_back = [
        campaign_id for campaign_id in ids if any(stats[campaign_id][f"fallback_{s}"] for s in MessageStatus.ACCEPTED)
    ]
    if fell_back:
        for campaign_id, count in db.session.execute(_DELIVERED_AFTER_FALLBACK, {"campaign_ids": fell_back}):
            stats[campaign_id]["delivered_after_fallback"] = count
    return stats


_REPLACED = aliased(OutboundMessage)
# Per campaign: its WhatsApp messages delivered although their SMS fallback went (what the fallback cost twice).
# Reads the campaign's fallbacks (`uq_outbound_messages_fallback_for`), each one's message by its id.
_DELIVERED_AFTER_FALLBACK = (
    select(OutboundMessage.campaign_id, func.count())
    .join(_REPLACED, _REPLACED.id == OutboundMessage.fallback_for)
    .where(
        OutboundMessage.campaign_id.in_(_IDS),
        OutboundMessage.fallback_for.is_not(None),
        OutboundMessage.status.in_(MessageStatus.ACCEPTED),
        _REPLACED.status == MessageStatus.DELIVERED,
    )
    .group_by(OutboundMessage.campaign_id)
)


def campaign_stats(campaign_id: int) -> dict[str, int]:
    """One campaign's stats (`stats_for`)."""
    return stats_for([campaign_id])[campaign_id]


def delivery_times(campaign_id: int) -> dict[str, float | None]:
    """How many of the campaign's messages were delivered (with both times), and the median and 95th
    percentile of their seconds from sent to delivered (continuous percentiles, as PostgreSQL's
    `percentile_cont`; None without any). Reads those messages: asked for on its own, never with stats."""
    delivered = and_(
        OutboundMessage.campaign_id == campaign_id,
        OutboundMessage.delivered_at.is_not(None),
        OutboundMessage.sent_at.is_not(None),
    )
    if counted_by_database():
        seconds = func.extract("epoch", OutboundMessage.delivered_at - OutboundMessage.sent_at)
        count, median, p95 = db.session.execute(
            select(
                func.count(),
                func.percentile_cont(0.5).within_group(seconds),
                func.percentile_cont(0.95).within_group(seconds),
            ).where(delivered)
        ).one()
        return {
            "delivered": count,
            "median": None if median is None else float(median),
            "p95": None if p95 is None else float(p95),
        }
    pairs = db.session.execute(select(OutboundMessage.sent_at, OutboundMessage.delivered_at).where(delivered))
    seconds = sorted((done - sent).total_seconds() for sent, done in pairs)
    return {"delivered": len(seconds), "median": _percentile(seconds, 0.5), "p95": _percentile(seconds, 0.95)}


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """`percentile_cont`: linear interpolation between the two nearest ranks."""
    if not ordered:
        return None
    at = fraction * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def waiting_quiet_hours_query(campaign_ids: Iterable[int]) -> Select:
    """Per campaign, its pending messages held until a time still ahead: by quiet hours, and by the provider
    (WhatsApp 131049, `provider_held_at`). Read from the partial index `ix_outbound_messages_waiting` (only
    pending messages with a `not_before` are in it), so it costs as much as there are waiting messages, not
    the campaign's size."""
    return _WAITING.params(campaign_ids=list(campaign_ids), now=clock.now())


_HELD_BY_PROVIDER = OutboundMessage.provider_held_at.is_not(None)
_WAITING = (
    select(
        OutboundMessage.campaign_id,
        func.sum(case((_HELD_BY_PROVIDER, 0), else_=1)),
        func.sum(case((_HELD_BY_PROVIDER, 1), else_=0)),
    )
    .where(
        OutboundMessage.campaign_id.in_(_IDS),
        OutboundMessage.status == MessageStatus.PENDING,
        OutboundMessage.not_before.is_not(None),
        OutboundMessage.not_before > bindparam("now", type_=OutboundMessage.not_before.type),
    )
    .group_by(OutboundMessage.campaign_id)
)


def fold(batch: int = FOLD_BATCH) -> int:
    """Move up to `batch` appended changes into the kept counts, in one transaction of its own; returns
    how many were moved (0 on SQLite, or when another process is folding right now: it will do it)."""
    if not counted_by_database():
        return 0
    with db.engine.begin() as conn:
        if not conn.scalar(select(func.pg_try_advisory_xact_lock(FOLD_LOCK))):
            return 0
        return int(conn.scalar(_FOLD, {"batch": batch}))


def fold_all(batch: int = FOLD_BATCH) -> int:
    """`fold` until no change is left (or another process folds); returns how many were moved."""
    moved = total = fold(batch)
    while moved == batch:
        moved = fold(batch)
        total += moved
    return total


def recount(campaign_id: int) -> None:
    """Replace the campaign's kept counts with a count of its rows, in a transaction of its own: run when
    a campaign ends, so that its final figures are exactly its rows whatever happened before (a change
    made with the triggers disabled, say). One pass over the campaign's messages, allowed as long as the
    audience send's (`SEND_STATEMENT_TIMEOUT`). A failure is logged, not raised: the kept counts stay
    right as they are, this only makes sure."""
    if not counted_by_database():
        return
    try:
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            db.session.execute(select(func.pg_advisory_xact_lock(FOLD_LOCK)))
            db.session.execute(_RECOUNT, {"campaign_id": campaign_id})
        db.session.commit()
    except Exception:  # noqa: BLE001 - see above
        db.session.rollback()
        log.warning("could not recount the stats of campaign %s", campaign_id, exc_info=True)


def pending_changes() -> int:
    """How many changes wait to be folded (for operators and benchmarks)."""
    return db.session.scalar(select(func.count()).select_from(CampaignMessageCountChange)) or 0


class Folder(Periodic):
    """`fold_all` every `STATS_FOLD_INTERVAL` seconds in a daemon thread of a worker process, until
    stopped. Every worker runs one; the advisory lock lets one fold at a time, the others find it taken
    and wait for their next turn. A failure (the database down) is logged and tried again next time."""

    def __init__(self, app: Flask) -> None:
        super().__init__(app.config["STATS_FOLD_INTERVAL"], "stats-fold")
        self.app = app

    def start(self) -> Folder:
        """Starts the thread where the database keeps the counts (PostgreSQL); SQLite counts the rows."""
        with self.app.app_context():
            if counted_by_database():
                super().start()
        return self

    def tick(self) -> None:
        with self.app.app_context():
            try:
                fold_all()
            except Exception:  # noqa: BLE001 - the changes stay, and are folded next time
                log.warning("could not fold the message count changes", exc_info=True)
            finally:
                db.session.remove()
