"""Clicks: what a short link's request records, and what the campaign's links add up to.

A click is one UPDATE of its message's row, by primary key, in a statement that commits by itself (one
round trip): the message's `clicks` + 1, its clicks at the link's position + 1, `first_clicked_at` set once,
and the link's URL returned, all only when the message has a link at that position. The status never
changes. The campaign's `clicked` and `clicks` follow through the counts' triggers (app.messaging.stats).

Requests from link-preview fetchers (`PREVIEW_AGENTS`: a chat app fetching the page to draw a card, a search
engine's crawler) and HEAD requests are redirected and count nothing.
"""

from __future__ import annotations

from datetime import datetime

import psycopg
from flask import Flask, current_app
from sqlalchemy import Engine, String, bindparam, select, text

from app.database import RoundTripTimeout, statement_budget, without_pre_ping
from app.extensions import db
from app.models import MessageStatus, OutboundMessage, UTCDateTime

# Substrings (lower case) of the User-Agent of link-preview fetchers and crawlers: such a request gets the
# redirect but is not a click. WhatsApp's fetcher says `WhatsApp/2.x`; Facebook's and Instagram's
# `facebookexternalhit` or `Facebot`; the rest name themselves.
PREVIEW_AGENTS = (
    "whatsapp",
    "facebookexternalhit",
    "facebot",
    "twitterbot",
    "slackbot",
    "telegrambot",
    "discordbot",
    "linkedinbot",
    "skypeuripreview",
    "googlebot",
    "bingbot",
    "applebot",
)


def is_preview(user_agent: str | None) -> bool:
    """Whether a request with this User-Agent comes from a link-preview fetcher or a crawler."""
    agent = (user_agent or "").lower()
    return any(name in agent for name in PREVIEW_AGENTS)


# PostgreSQL: plain psycopg on a pooled connection in autocommit (one round trip, prepared by psycopg after
# a few runs on a connection); the URL comes back from the UPDATE itself.
_PG_CLICK = """
    UPDATE outbound_messages
    SET clicks = clicks + 1,
        first_clicked_at = coalesce(first_clicked_at, %(now)s),
        link_clicks = jsonb_set(
            coalesce(link_clicks, '{}'::jsonb), ARRAY[%(key)s::text],
            to_jsonb(coalesce((link_clicks ->> %(key)s::text)::int, 0) + 1)
        )
    WHERE id = %(message_id)s AND links ->> %(position)s::integer IS NOT NULL
    RETURNING links ->> %(position)s::integer
"""
_PG_FIND = "SELECT links ->> %(position)s::integer FROM outbound_messages WHERE id = %(message_id)s"

# SQLite (tests, a local run): through SQLAlchemy, whose type stores the time as the app's other times.
_SQLITE_CLICK = (
    text(
        """
        UPDATE outbound_messages
        SET clicks = clicks + 1,
            first_clicked_at = coalesce(first_clicked_at, :now),
            link_clicks = json_set(
                coalesce(link_clicks, '{}'), :key_path,
                coalesce(json_extract(link_clicks, :key_path), 0) + 1
            )
        WHERE id = :message_id AND json_extract(links, :path) IS NOT NULL
        RETURNING json_extract(links, :path) AS url
        """
    )
    .bindparams(bindparam("now", type_=UTCDateTime()))
    .columns(url=String)
)
_SQLITE_FIND = text("SELECT json_extract(links, :path) AS url FROM outbound_messages WHERE id = :message_id").columns(
    url=String
)


def _params(message_id: int, position: int) -> dict:
    return {
        "message_id": message_id,
        "position": position,
        "key": str(position),
        "path": f"$[{position}]",
        "key_path": f'$."{position}"',
    }


def engine_of(app: Flask) -> Engine:
    """`app`'s database engine, for code that runs outside an app context (the redirect)."""
    engine = app.extensions.get("links_engine")
    if engine is None:
        with app.app_context():
            engine = app.extensions["links_engine"] = db.engine
    return engine


def _one(engine: Engine, pg_sql: str, sqlite_statement, params: dict) -> str | None:
    """The one value `pg_sql` (PostgreSQL) or `sqlite_statement` returns, the statement committed by itself."""
    if engine.dialect.driver != "psycopg":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            return connection.execute(sqlite_statement, params).scalar()
    # A pooled connection without the pool's pre-ping first (a round trip saved on every click). One that
    # turns out dead (the server restarted since it was pooled) fails at once, before its statement can run,
    # and the statement is tried once more on a connection the pool pings.
    with without_pre_ping():
        pooled = engine.raw_connection()
    try:
        return _run(pooled, pg_sql, params)
    except _DeadConnection:
        return _run(engine.raw_connection(), pg_sql, params)


# What a server says on a connection it ended before the statement came (a restart, a crash elsewhere).
_ENDED_BEFORE = frozenset({"57P01", "57P02"})


class _DeadConnection(psycopg.OperationalError):
    """The pooled connection was dead before its statement ran: the statement did not run."""


def _run(pooled, sql: str, params: dict) -> str | None:
    """`sql` in autocommit on the checked-out `pooled` connection, which goes back to the pool after (or is
    dropped, if anything failed: its state is unknown). Raises `_DeadConnection` when the server had closed
    the connection already (not a timeout: a hung server is not asked twice)."""
    conn = pooled.driver_connection
    try:
        conn.autocommit = True
        try:
            row = conn.execute(sql, params).fetchone()
        finally:
            if not conn.closed:
                conn.autocommit = False
    except psycopg.OperationalError as exc:
        ended = exc.sqlstate in _ENDED_BEFORE or (exc.sqlstate is None and not isinstance(exc, RoundTripTimeout))
        dead = conn.closed and ended
        pooled.invalidate()
        if dead:
            raise _DeadConnection(str(exc)) from exc
        raise
    except BaseException:
        pooled.invalidate()
        raise
    pooled.close()
    return None if row is None else row[0]


def click(engine: Engine, message_id: int, position: int, now: datetime) -> str | None:
    """Record a click on the link at `position` of message `message_id` and return its URL; None (nothing
    recorded) when there is no such link. One statement, committed by itself."""
    return _one(engine, _PG_CLICK, _SQLITE_CLICK, {**_params(message_id, position), "now": now})


def find(engine: Engine, message_id: int, position: int) -> str | None:
    """The URL of the link at `position` of message `message_id`, recording nothing; None when there is none."""
    return _one(engine, _PG_FIND, _SQLITE_FIND, _params(message_id, position))


_PER_LINK = text(
    """
    SELECT link.url,
           count(*) AS messages,
           coalesce(sum((m.link_clicks ->> (link.n - 1)::text)::int), 0) AS clicks,
           count(*) FILTER (WHERE (m.link_clicks ->> (link.n - 1)::text) IS NOT NULL) AS clicked,
           count(*) FILTER (WHERE m.status = :delivered) AS delivered,
           count(*) FILTER (WHERE m.status IN (:sent, :delivered, :undelivered)) AS sent
    FROM outbound_messages AS m
    CROSS JOIN LATERAL jsonb_array_elements_text(m.links) WITH ORDINALITY AS link(url, n)
    WHERE m.campaign_id = :campaign_id AND m.links IS NOT NULL
    GROUP BY link.url
    ORDER BY clicks DESC, link.url
    """
)


def link_counts(campaign_id: int) -> list[dict]:
    """Per original URL of the campaign's messages: `messages` carrying it, its `clicks`, messages in which it
    was `clicked`, and of its messages those `delivered` and those `sent` (accepted by the provider)."""
    if db.engine.dialect.name == "postgresql":
        # A pass over the campaign's messages (about 1.5-2 s a million): the send's time limit, not a request's.
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            rows = db.session.execute(
                _PER_LINK,
                {
                    "campaign_id": campaign_id,
                    "sent": MessageStatus.SENT,
                    "delivered": MessageStatus.DELIVERED,
                    "undelivered": MessageStatus.UNDELIVERED,
                },
            ).all()
        return [dict(row._mapping) for row in rows]
    # SQLite (tests, a local run): added up here.
    totals: dict[str, dict] = {}
    rows = db.session.execute(
        select(OutboundMessage.links, OutboundMessage.link_clicks, OutboundMessage.status).where(
            OutboundMessage.campaign_id == campaign_id, OutboundMessage.links.is_not(None)
        )
    )
    for links, link_clicks, status in rows:
        for position, url in enumerate(links or []):
            total = totals.setdefault(
                url, {"url": url, "messages": 0, "clicks": 0, "clicked": 0, "delivered": 0, "sent": 0}
            )
            clicks = int((link_clicks or {}).get(str(position), 0))
            total["messages"] += 1
            total["clicks"] += clicks
            total["clicked"] += 1 if clicks else 0
            total["delivered"] += status == MessageStatus.DELIVERED
            total["sent"] += status in MessageStatus.ACCEPTED
    return sorted(totals.values(), key=lambda t: (-t["clicks"], t["url"]))
