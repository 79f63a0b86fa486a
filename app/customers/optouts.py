"""Opt-outs: a customer who asked not to be messaged on a channel (sms, whatsapp) is never messaged there.

One row per (customer, channel) in `customer_opt_outs`, kept while they are opted out and deleted when they
opt back in. Opting out again keeps the first time and source: the record says when they first asked.
`not_opted_out(channel)` is the filter every query that picks recipients uses (the send's
`INSERT ... SELECT`, estimates): a correlated `NOT EXISTS`, which PostgreSQL runs as an anti-join.
Opt-outs arrive from keywords customers reply (`STOP`), from providers, the API and imports; every write
here is one statement, safe when two arrive at once.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable

from flask import current_app
from sqlalchemy import ColumnElement, and_, delete, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite

from app import clock
from app.customers.phones import InvalidPhone, normalize_phone
from app.extensions import db
from app.models import Customer, CustomerOptOut, OptOutSource

log = logging.getLogger(__name__)

_opt_outs = CustomerOptOut.__table__


def opted_out(channel: str) -> ColumnElement[bool]:
    """Customers opted out of `channel` (a condition on `Customer`)."""
    return exists().where(_opt_outs.c.customer_id == Customer.id, _opt_outs.c.channel == channel)


def not_opted_out(channel: str) -> ColumnElement[bool]:
    """Customers who may be messaged on `channel` (a condition on `Customer`): for a send's recipients, and
    anything that counts them ahead of it."""
    return ~opted_out(channel)


def opt_out_ids(customer_ids: Iterable[int], channel: str, source: str) -> int:
    """Opt these customers out of `channel`, from `source`, in the caller's transaction; those already
    opted out keep their first time and source. Returns how many were newly opted out."""
    ids = sorted(set(customer_ids))  # one order for every writer: no deadlock between two of them
    if not ids:
        return 0
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = clock.now()
    rows = [{"customer_id": i, "channel": channel, "opted_out_at": now, "source": source} for i in ids]
    stmt = insert(_opt_outs).values(rows).on_conflict_do_nothing(index_elements=["customer_id", "channel"])
    return db.session.execute(stmt).rowcount


def opt_out_at_provider(customer_id: int, channel: str, message_id: int | None = None) -> bool:
    """The provider refused or failed a message because its recipient opted out with it (Twilio 21610,
    WhatsApp 131050): record the opt-out here too (source `provider`), in the caller's transaction, so that
    later sends leave them out before reaching the provider. True when they were not opted out before."""
    changed = bool(opt_out_ids([customer_id], channel, OptOutSource.PROVIDER))
    log.info(
        "the provider says the recipient opted out; customer opted out",
        extra={"message_id": message_id, "customer_id": customer_id, "channel": channel, "changed": changed},
    )
    return changed


def opt_in_ids(customer_ids: Iterable[int], channel: str) -> int:
    """Opt these customers back in to `channel`, in the caller's transaction; returns how many were opted out."""
    ids = sorted(set(customer_ids))
    if not ids:
        return 0
    return db.session.execute(
        delete(_opt_outs).where(_opt_outs.c.customer_id.in_(ids), _opt_outs.c.channel == channel)
    ).rowcount


def inbound_phone(raw: str) -> str | None:
    """An inbound sender's number in E.164, as customers store it: Twilio and Africa's Talking send
    `+254...`, WhatsApp `254...` (international, without the plus); a national `07...` is read in
    `DEFAULT_PHONE_REGION`. None when it is no phone number."""
    raw = (raw or "").strip()
    if not raw:
        return None
    candidate = raw if raw.startswith(("+", "0")) else f"+{raw}"
    try:
        return normalize_phone(candidate, current_app.config["DEFAULT_PHONE_REGION"])
    except InvalidPhone:
        return None


def keyword_form(text: str) -> str:
    """`text` as keywords are compared: Unicode compatibility forms folded (NFKC: fullwidth `ＳＴＯＰ` is
    `STOP`), format characters removed (category Cf: zero-width spaces and joiners, a byte order mark, soft
    hyphens, bidirectional marks), trimmed and upper-cased."""
    folded = unicodedata.normalize("NFKC", text)
    return "".join(c for c in folded if unicodedata.category(c) != "Cf").strip().upper()


def keyword_action(text: str | None) -> str | None:
    """`"opt_out"` or `"opt_in"` when the message's text, in `keyword_form`, is one of the keywords (any
    case), else None."""
    word = keyword_form(text or "")
    if not word:
        return None
    if word in {keyword_form(k) for k in current_app.config["OPT_OUT_KEYWORDS"]}:
        return "opt_out"
    if word in {keyword_form(k) for k in current_app.config["OPT_IN_KEYWORDS"]}:
        return "opt_in"
    return None


def apply_by_phone(phone: str | None, channel: str, action: str, source: str) -> bool:
    """Opt the customer with this phone out of (or back in to) `channel`, and commit. False when no
    customer has the number (ignored: a stranger's reply)."""
    customer_id = db.session.scalar(select(Customer.id).where(Customer.phone == phone)) if phone else None
    if customer_id is None:
        db.session.rollback()
        log.info("opt-out message from an unknown number ignored", extra={"channel": channel, "action": action})
        return False
    if action == "opt_out":
        changed = opt_out_ids([customer_id], channel, source)
    else:
        changed = opt_in_ids([customer_id], channel)
    db.session.commit()
    log.info(
        "customer %s",
        "opted out" if action == "opt_out" else "opted in",
        extra={"customer_id": customer_id, "channel": channel, "source": source, "changed": bool(changed)},
    )
    return True


def count_opted_out(audience: ColumnElement[bool], channel: str) -> int:
    """How many customers matching `audience` are opted out of `channel`: read from the opt-outs (few)
    joined to their customers, not from every customer."""
    return db.session.scalar(
        select(func.count())
        .select_from(_opt_outs)
        .join(Customer, Customer.id == _opt_outs.c.customer_id)
        .where(and_(_opt_outs.c.channel == channel, audience))
    )
