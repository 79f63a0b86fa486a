"""Campaign and message statuses: the transitions allowed between them, and the one way each happens.

Every status change is a conditional UPDATE that names the statuses it may come from (taken from the
tables below), so two workers, a webhook and an operator acting at once cannot undo each other: the
second finds the row no longer in a state it may leave, and changes nothing. docs/architecture.md shows
the tables; a test checks that every function here moves only along them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    String,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    null,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import aliased

from app import clock
from app.extensions import db
from app.messaging import fallback_spec, stats
from app.messaging.providers import whatsapp_cloud
from app.messaging.recipients import NewRows
from app.models import (
    Campaign,
    CampaignStatus,
    CustomerImport,
    ErrorClass,
    ImportStatus,
    MessageStatus,
    OutboundMessage,
)

# Status -> the statuses it may move to.
CAMPAIGN_TRANSITIONS: dict[str, frozenset[str]] = {
    CampaignStatus.DRAFT: frozenset({CampaignStatus.SCHEDULED, CampaignStatus.SENDING, CampaignStatus.CANCELED}),
    CampaignStatus.SCHEDULED: frozenset(
        {CampaignStatus.DRAFT, CampaignStatus.SENDING, CampaignStatus.PAUSED, CampaignStatus.CANCELED}
    ),
    CampaignStatus.SENDING: frozenset(
        {CampaignStatus.SENT, CampaignStatus.FAILED, CampaignStatus.PAUSED, CampaignStatus.CANCELED}
    ),
    # Resumed: sending, or scheduled again when its time is still ahead.
    CampaignStatus.PAUSED: frozenset({CampaignStatus.SENDING, CampaignStatus.SCHEDULED, CampaignStatus.CANCELED}),
    # retry-failed sends its failed messages again.
    CampaignStatus.SENT: frozenset({CampaignStatus.SENDING}),
    CampaignStatus.FAILED: frozenset({CampaignStatus.SENDING}),
    CampaignStatus.CANCELED: frozenset(),
}
MESSAGE_TRANSITIONS: dict[str, frozenset[str]] = {
    # Pending: waiting its turn. A window refill queues it; a cancel cancels it. `sent` only for the late
    # record of a claim that was lost meanwhile (below).
    MessageStatus.PENDING: frozenset({MessageStatus.QUEUED, MessageStatus.CANCELED, MessageStatus.SENT}),
    # Queued: its job is in Redis. Its job claims it, or finds the campaign paused (back to pending, out of
    # the window) or canceled; the reconciler puts it back in line when Redis lost its job.
    MessageStatus.QUEUED: frozenset(
        {MessageStatus.SENDING, MessageStatus.PENDING, MessageStatus.CANCELED, MessageStatus.SENT}
    ),
    # Sending: claimed. The attempt's outcome; queued again for a retry or a hand-back (its job runs
    # again); pending when quiet hours, a pause or an account refusal hold it, or when its lease passed
    # (the reconciler); canceled when its customer opted out meanwhile.
    MessageStatus.SENDING: frozenset(
        {
            MessageStatus.SENT,
            MessageStatus.FAILED,
            MessageStatus.QUEUED,
            MessageStatus.PENDING,
            MessageStatus.CANCELED,
        }
    ),
    # The provider's receipts. Never a step back: a late `sent` after `delivered`, or a repeated receipt,
    # changes nothing (a `read` one only sets `read_at` on a delivered message).
    # And back to pending, once, when the provider held it back to try later (WhatsApp 131049, `hold_for_provider`).
    MessageStatus.SENT: frozenset(
        {MessageStatus.DELIVERED, MessageStatus.UNDELIVERED, MessageStatus.FAILED, MessageStatus.PENDING}
    ),
    MessageStatus.DELIVERED: frozenset(),
    # retry-failed: a transient failure is tried again, with fresh retries.
    MessageStatus.UNDELIVERED: frozenset({MessageStatus.PENDING}),
    MessageStatus.FAILED: frozenset({MessageStatus.PENDING}),
    # The late record of a claim lost meanwhile (its lease passed), whose provider took the message: it did
    # go out, and says so, whatever happened to it since (short of another claim).
    MessageStatus.CANCELED: frozenset({MessageStatus.SENT}),
}


IMPORT_TRANSITIONS: dict[str, frozenset[str]] = {
    # Its job starts it.
    ImportStatus.QUEUED: frozenset({ImportStatus.RUNNING}),
    # A run that resumes after a crash starts it again; it ends done, or failed (a file that cannot be read
    # on, or a run that keeps failing at the same place).
    ImportStatus.RUNNING: frozenset({ImportStatus.RUNNING, ImportStatus.DONE, ImportStatus.FAILED}),
    ImportStatus.DONE: frozenset(),
    ImportStatus.FAILED: frozenset(),
}


def sources(transitions: dict[str, frozenset[str]], target: str) -> list[str]:
    """The statuses from which `target` may be reached, in the table's order."""
    return [status for status, targets in transitions.items() if target in targets]


def move_campaign(campaign_id: int, target: str, *conditions: ColumnElement[bool], **values) -> bool:
    """Move the campaign to `target` from any status the table allows, if `conditions` hold too, in one
    UPDATE in the caller's transaction (the caller commits). True when this call made the move."""
    result = db.session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.status.in_(sources(CAMPAIGN_TRANSITIONS, target)), *conditions)
        .values(status=target, updated_at=clock.now(), **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def set_schedule(campaign_id: int, scheduled_at: datetime | None) -> str:
    """A draft or scheduled campaign's new `scheduled_at`: scheduled when it has a time, draft when it
    has none. Returns the status it now has; in the caller's transaction, on its locked row."""
    target = CampaignStatus.SCHEDULED if scheduled_at is not None else CampaignStatus.DRAFT
    # No move when it already has that status.
    move_campaign(campaign_id, target, Campaign.status.in_(CampaignStatus.EDITABLE), status_reason=None)
    return target


def start_sending(campaign_id: int) -> bool:
    """Draft or scheduled -> sending, in the caller's transaction. True when this call made the move."""
    return move_campaign(
        campaign_id, CampaignStatus.SENDING, Campaign.status.in_(CampaignStatus.EDITABLE), status_reason=None
    )


def pause(campaign_id: int) -> bool:
    """Sending or scheduled -> paused, in the caller's transaction (on its locked row). Send jobs that run
    while it is paused leave their message pending (`send_outbound_message`)."""
    return move_campaign(
        campaign_id, CampaignStatus.PAUSED, Campaign.status.in_(CampaignStatus.PAUSABLE), status_reason=None
    )


def pause_for_account(campaign_id: int, reason: str) -> bool:
    """Sending -> paused because the provider refused the account (balance, credentials, sender id,
    template): every other message would be refused too. Commits; True when this call made the move (of
    several workers refused at once, one does)."""
    moved = move_campaign(
        campaign_id, CampaignStatus.PAUSED, Campaign.status == CampaignStatus.SENDING, status_reason=reason[:2000]
    )
    db.session.commit()
    return moved


def resume(campaign_id: int, now: datetime | None = None) -> str | None:
    """Paused -> scheduled when its `scheduled_at` is still ahead, else sending; in the caller's
    transaction, on its locked row. Returns the new status, or None when it was not paused."""
    now = now or clock.now()
    ahead = and_(Campaign.scheduled_at.is_not(None), Campaign.scheduled_at > now)
    paused = Campaign.status == CampaignStatus.PAUSED
    if move_campaign(campaign_id, CampaignStatus.SCHEDULED, paused, ahead, status_reason=None):
        return CampaignStatus.SCHEDULED
    if move_campaign(campaign_id, CampaignStatus.SENDING, paused, status_reason=None):
        return CampaignStatus.SENDING
    return None


def cancel(campaign_id: int) -> bool:
    """Draft, scheduled, sending or paused -> canceled, in the caller's transaction: the campaign row only,
    so that the caller commits at once and no send job claims another of its messages from then on. Its
    waiting messages are canceled afterwards, in batches (`cancel_waiting_messages`). True when this call
    made the move."""
    return move_campaign(
        campaign_id, CampaignStatus.CANCELED, Campaign.status.in_(CampaignStatus.CANCELABLE), status_reason=None
    )


# Messages a cancel moves per transaction: short enough that nothing waits on it for long.
CANCEL_BATCH = 5000
_WAITING_STATUSES = (MessageStatus.PENDING, MessageStatus.QUEUED)


def cancel_waiting_messages(campaign_id: int, batch: int = CANCEL_BATCH) -> int:
    """Up to `batch` messages of the canceled campaign that still wait (pending or queued) -> canceled, in
    the caller's transaction; returns how many. Rows another transaction holds (a send claiming one right
    now) are skipped, never waited for: a claim of a canceled campaign's message cancels it itself.
    Messages being sent are left to their send, which records what the provider said."""
    picked = (
        select(OutboundMessage.id)
        .where(OutboundMessage.campaign_id == campaign_id, OutboundMessage.status.in_(_WAITING_STATUSES))
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    canceled = select(Campaign.id).where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.CANCELED)
    return db.session.execute(
        update(OutboundMessage)
        .where(
            OutboundMessage.id.in_(picked.scalar_subquery()),
            OutboundMessage.status.in_(_WAITING_STATUSES),
            canceled.exists(),
        )
        .values(status=MessageStatus.CANCELED, updated_at=clock.now())
        .execution_options(synchronize_session=False)
    ).rowcount


def cancel_all_waiting(campaign_id: int, seconds: float | None = None) -> tuple[int, bool]:
    """Cancel the canceled campaign's waiting messages, a batch per transaction (each committed), for at
    most `seconds` (None: until none is left). Returns how many, and whether none is left."""
    deadline = None if seconds is None else time.monotonic() + seconds
    total = 0
    while True:
        moved = cancel_waiting_messages(campaign_id)
        db.session.commit()
        total += moved
        if moved < CANCEL_BATCH:
            if not waiting_messages_left(campaign_id):
                db.session.commit()
                return total, True
            time.sleep(0.01)  # a batch skipped a row another transaction held for a moment: look again
        if deadline is not None and time.monotonic() > deadline:
            db.session.commit()
            return total, False


def waiting_messages_left(campaign_id: int) -> bool:
    """Whether the campaign has a message still pending or queued (a canceled one's, left by a batch that
    skipped a row another transaction held)."""
    return any(
        db.session.scalar(_last_of(status), {"campaign_id": campaign_id}) is not None for status in _WAITING_STATUSES
    )


def reopen_for_retry(campaign_id: int) -> bool:
    """Sent or failed -> sending, for retry-failed, in the caller's transaction (a sending campaign stays
    as it is). True when this call made the move."""
    return move_campaign(
        campaign_id,
        CampaignStatus.SENDING,
        Campaign.status.in_((CampaignStatus.SENT, CampaignStatus.FAILED)),
        status_reason=None,
    )


def retry_failed_messages(campaign_id: int, retryable: ColumnElement[bool]) -> NewRows:
    """Failed or undelivered messages matching `retryable` -> pending, with fresh retries, in one UPDATE in
    the caller's transaction (those replaced by an SMS fallback left as they are); returns how many and their
    id range (for queueing them). Their provider
    and provider id are cleared: the new attempt records its own, and a late receipt for the old id finds
    no message to change (it is kept, unmatched)."""
    stmt = (
        update(OutboundMessage)
        .where(
            OutboundMessage.campaign_id == campaign_id,
            OutboundMessage.status.in_((MessageStatus.FAILED, MessageStatus.UNDELIVERED)),
            retryable,
            # A WhatsApp message whose SMS fallback exists is not sent again: its customer was reached by SMS.
            ~replaced_by_fallback(OutboundMessage),
        )
        .values(
            status=MessageStatus.PENDING,
            retry_count=0,
            provider=None,
            provider_message_id=None,
            sent_at=None,
            delivered_at=None,
            read_at=None,
            updated_at=clock.now(),
        )
        .returning(OutboundMessage.id)
        .execution_options(synchronize_session=False)
    )
    if db.session.get_bind().dialect.name == "postgresql":
        # Counted in the database: a large retry sends back three numbers, not every id.
        moved = stmt.cte("moved")
        count, first, last = db.session.execute(select(func.count(), func.min(moved.c.id), func.max(moved.c.id))).one()
        return NewRows(count, first, last)
    ids = db.session.scalars(stmt).all()
    return NewRows(len(ids), min(ids, default=None), max(ids, default=None))


def replaced_by_fallback(message) -> ColumnElement[bool]:
    """Whether `message` (the messages' table or an alias of it) has an SMS fallback already."""
    fallbacks = aliased(OutboundMessage)
    return exists().where(fallbacks.campaign_id == message.campaign_id, fallbacks.fallback_for == message.id)


def may_still_trigger_fallback(campaign_id: int, spec: dict | None, now: datetime | None = None) -> bool:
    """Whether a WhatsApp message of the campaign could still trigger its SMS fallback (app.messaging.fallback):
    one the provider took (`sent`) without a delivered status or a fallback, whose not-delivered window has not
    passed (the time a late failure is still acted on, whatever triggers the fallback), or, when `not_delivered`
    triggers it, has passed with its fallback not made yet; or one whose failure triggers a fallback not made
    yet. The campaign does not end meanwhile."""
    if not spec:
        return False
    now = now or clock.now()
    sent = OutboundMessage.status == MessageStatus.SENT
    if not fallback_spec.triggers_on(spec, fallback_spec.NOT_DELIVERED):
        sent = and_(sent, OutboundMessage.sent_at > now - fallback_spec.within(spec))
    codes = whatsapp_cloud.fallback_codes(spec)
    # A failure that triggers one whose fallback is not made yet (the reconciler makes it).
    triggered = and_(OutboundMessage.status == MessageStatus.FAILED, OutboundMessage.error_code.in_(codes))
    waiting = and_(
        OutboundMessage.campaign_id == campaign_id,
        OutboundMessage.fallback_for.is_(None),
        or_(sent, triggered) if codes else sent,
        ~replaced_by_fallback(OutboundMessage),
    )
    return bool(db.session.scalar(select(exists().where(waiting))))


def start_due_campaign(
    campaign_id: int, now: datetime | None = None, then: Callable[[int], object] | None = None
) -> bool:
    """Scheduled -> sending once `scheduled_at` has come, and commit: a trigger that fires twice, early, or
    for an old time moves nothing. `then(campaign_id)` runs after the move, in its transaction (the
    recipients of a segment evaluated as the campaign fires). True when this call made the move."""
    now = now or clock.now()
    moved = move_campaign(
        campaign_id, CampaignStatus.SENDING, Campaign.status == CampaignStatus.SCHEDULED, Campaign.scheduled_at <= now
    )
    if moved and then is not None:
        then(campaign_id)
    db.session.commit()
    return moved


def _is(column, value: str) -> ColumnElement[bool]:
    """`column = 'value'` with the value written into the SQL, not bound: the planner then sees that a
    partial index's condition holds (`status = 'pending'`), on a prepared statement too. Only for the
    module's own constants."""
    return column == literal_column(f"'{value}'")


def _last_of(status: str):
    """The campaign's message in `status` with the highest id, if any. Sends go out roughly in id order,
    and the index range of a status fills from the bottom with entries of messages that left it (dead
    until vacuum), so the range is read from the top: `EXISTS` reads it from the bottom (PostgreSQL drops
    an ORDER BY inside EXISTS), which at 90% of a 100k campaign made the check 1.3 ms instead of 0.8."""
    return (
        select(OutboundMessage.id)
        .where(OutboundMessage.campaign_id == bindparam("campaign_id"), _is(OutboundMessage.status, status))
        .order_by(OutboundMessage.id.desc())
        .limit(1)
    )


# Some message of the campaign not finished yet (pending, queued or being sent), or null: one index probe
# per status at most (COALESCE stops at the first it finds).
UNFINISHED = select(func.coalesce(*(_last_of(status).scalar_subquery() for status in MessageStatus.UNFINISHED)))


def _in_status_upto(status: str):
    limited = (
        select(OutboundMessage.id)
        .where(OutboundMessage.campaign_id == bindparam("campaign_id"), _is(OutboundMessage.status, status))
        .limit(bindparam("cap"))
        .subquery()
    )
    return select(func.count()).select_from(limited).scalar_subquery()


# A sending campaign's window as a send job sees it after its record: how many of its messages are queued
# or being sent (each counted up to `cap`, a window's size: it reads no more), and whether one is pending
# (waiting for a refill; or held by quiet hours).
WINDOW_STATE = select(
    (_in_status_upto(MessageStatus.QUEUED) + _in_status_upto(MessageStatus.SENDING)).label("in_window"),
    _last_of(MessageStatus.PENDING).scalar_subquery().is_not(None).label("pending"),
)


def unfinished_exists(connection, campaign_id: int) -> bool:
    """Whether the campaign has a message not finished yet, as `connection` sees it."""
    return connection.scalar(UNFINISHED, {"campaign_id": campaign_id}) is not None


def unfinished_exists_now(campaign_id: int) -> bool:
    """Whether the campaign has a message not finished yet, read outside any transaction (one round trip)."""
    with db.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        return unfinished_exists(conn, campaign_id)


def _has_messages(campaign_id: int, statuses: tuple[str, ...] | None = None) -> bool:
    conditions = [OutboundMessage.campaign_id == campaign_id]
    if statuses:
        conditions.append(OutboundMessage.status.in_(statuses))
    return bool(db.session.scalar(select(exists().where(and_(*conditions)))))


def finish_campaign(campaign_id: int, checked: bool = False) -> str | None:
    """If the `sending` campaign has no message left unfinished (pending, queued or being sent), end it:
    `sent` when a provider accepted at least one message, else `failed` with the reason. Returns the new
    status, or None when nothing changed.

    Call after the commit of the message that may have been the last (`checked` when the caller has just
    seen, after that commit, that nothing is left). Safe when several workers finish the last messages at
    once: the campaign row is locked before the final check, so the check sees every commit that came
    before, and only one caller moves it out of `sending`. The one that does recounts the campaign's stats
    from its rows (`stats.recount`).
    """
    if not checked and unfinished_exists_now(campaign_id):
        return None  # the common case: a few indexed lookups, no lock, no transaction
    locked = db.session.execute(
        select(Campaign.id, Campaign.sms_fallback)
        # Not while a send still adds its recipients (app.messaging.recipient_batches): more are coming.
        .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.SENDING, Campaign.adding_after.is_(None))
        .with_for_update()
    ).first()
    if (
        locked is None
        or unfinished_exists(db.session, campaign_id)
        # Nor while a WhatsApp message may still trigger its SMS fallback.
        or may_still_trigger_fallback(campaign_id, locked.sms_fallback)
    ):
        db.session.commit()
        return None
    if _has_messages(campaign_id, MessageStatus.ACCEPTED):
        status, reason = CampaignStatus.SENT, None
    elif _has_messages(campaign_id):
        status, reason = CampaignStatus.FAILED, "no message could be sent"
    else:
        status, reason = CampaignStatus.FAILED, "the campaign had no recipients when it was dispatched"
    moved = move_campaign(campaign_id, status, status_reason=reason)
    db.session.commit()
    if not moved:
        return None
    stats.recount(campaign_id)  # its final figures: a count of its rows
    return status


# --- the send path: a message enters its campaign's window, is claimed, and its claim ends ---------------

_M = OutboundMessage.__table__
_C = Campaign.__table__


def queue_next(campaign_id: int, room: int, now: datetime) -> list[tuple[int, int, int]]:
    """Up to `room` of the sending campaign's pending messages -> queued, in the caller's transaction:
    first those held by quiet hours whose time has come, then the others in id order. Each one's
    `job_seq` is counted up (its job's id, `app.messaging.send.window`). Rows another transaction holds
    are skipped (two refills at once take different rows). Returns `(id, job_seq, retry_count)` of each,
    oldest first."""
    due = (
        select(_M.c.id)
        .where(
            _M.c.campaign_id == campaign_id,
            _is(_M.c.status, MessageStatus.PENDING),
            _M.c.not_before.is_not(None),
            _M.c.not_before <= now,
        )
        .order_by(_M.c.not_before)
        .limit(room)
        .subquery()
    )
    ready = (
        select(_M.c.id)
        .where(_M.c.campaign_id == campaign_id, _is(_M.c.status, MessageStatus.PENDING), _M.c.not_before.is_(None))
        .order_by(_M.c.id)
        .limit(room)
        .subquery()
    )
    candidates = union_all(select(due.c.id), select(ready.c.id)).subquery()
    picked = (
        select(_M.c.id)
        .where(_M.c.id.in_(select(candidates.c.id)), _M.c.status == MessageStatus.PENDING)
        .order_by(_M.c.id)
        .limit(room)
        .with_for_update(skip_locked=True)
    )
    sending = select(_C.c.id).where(_C.c.id == campaign_id, _C.c.status == CampaignStatus.SENDING)
    rows = db.session.execute(
        update(_M)
        .where(_M.c.id.in_(picked.scalar_subquery()), _M.c.status == MessageStatus.PENDING, sending.exists())
        .values(status=MessageStatus.QUEUED, job_seq=_M.c.job_seq + 1, updated_at=now)
        .returning(_M.c.id, _M.c.job_seq, _M.c.retry_count)
    ).all()
    return sorted(tuple(row) for row in rows)


_CAMPAIGN_SENDING = _C.c.status == CampaignStatus.SENDING

# A send job claims its message: queued with the job's own `job_seq` -> sending, with the worker, its lease
# and a token naming this claim, when the campaign (read in the same statement) is sending. A paused
# campaign's message goes back to pending instead (out of the window: resume queues it again), a canceled
# one's is canceled. One statement, committed at once: no lock is held past it. A job from an earlier
# turn of the message (another `job_seq`) changes nothing.
CLAIM = (
    update(_M)
    .where(
        _M.c.id == bindparam("message_id"),
        _M.c.status == MessageStatus.QUEUED,
        _M.c.job_seq == bindparam("queued_seq"),
        _C.c.id == _M.c.campaign_id,
    )
    .values(
        status=case(
            (_CAMPAIGN_SENDING, MessageStatus.SENDING),
            (_C.c.status == CampaignStatus.CANCELED, MessageStatus.CANCELED),
            else_=MessageStatus.PENDING,
        ),
        claimed_by=case((_CAMPAIGN_SENDING, bindparam("worker", type_=String)), else_=null()),
        lease_until=case((_CAMPAIGN_SENDING, bindparam("lease", type_=_M.c.lease_until.type)), else_=null()),
        claim_token=case((_CAMPAIGN_SENDING, bindparam("token", type_=BigInteger)), else_=null()),
        updated_at=bindparam("now"),
    )
    .returning(
        _M.c.id, _M.c.status, _M.c.retry_count, _M.c.campaign_id, _M.c.customer_id, _M.c.fallback_for, _M.c.variant
    )
)

# A claim ends: what its attempt came to (`sent`, `failed`, `canceled`), or the message goes back to
# queued (a retry or a hand-back: its job runs again) or pending (held by quiet hours until `not_before`,
# by a pause, by an account refusal). Only the claim that holds the message records (`claim_token`), so a
# claim whose lease passed cannot overwrite a later one. The one exception: a `sent` outcome recorded
# after its claim was lost (its lease passed meanwhile) while the message still waits, or was canceled:
# the provider took it, so it did go out, and says so. Fixed SQL (plain comparisons), compiled once by the
# send job's store.
# A message's links as a bound value: None is SQL NULL (no links), not JSON's null.
_LINKS = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
RECORD = (
    update(_M)
    .where(
        _M.c.id == bindparam("message_id"),
        or_(
            and_(_M.c.status == MessageStatus.SENDING, _M.c.claim_token == bindparam("token")),
            and_(
                bindparam("new_status", type_=String) == MessageStatus.SENT,
                # Plain comparisons, not IN: the store compiles this once, and IN's values are bound late.
                or_(*(_M.c.status == s for s in (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.CANCELED))),
            ),
        ),
    )
    .values(
        status=bindparam("new_status"),
        rendered_content=func.coalesce(bindparam("body"), _M.c.rendered_content),
        segments=func.coalesce(bindparam("segments"), _M.c.segments),
        # A message's links are the same on every attempt (its codes come from its id): the first are kept.
        links=func.coalesce(_M.c.links, bindparam("links", type_=_LINKS)),
        # A success keeps the last error, its code and class, for the record.
        last_error=func.coalesce(bindparam("error"), _M.c.last_error),
        error_code=func.coalesce(bindparam("error_code"), _M.c.error_code),
        error_class=func.coalesce(bindparam("error_class"), _M.c.error_class),
        retry_count=bindparam("retries_used"),
        provider=func.coalesce(bindparam("provider"), _M.c.provider),
        provider_message_id=func.coalesce(bindparam("provider_message_id"), _M.c.provider_message_id),
        not_before=func.coalesce(bindparam("not_before", type_=_M.c.not_before.type), _M.c.not_before),
        sent_at=case(
            (
                bindparam("new_status", type_=String) == MessageStatus.SENT,
                func.coalesce(_M.c.sent_at, bindparam("now")),
            ),
            else_=_M.c.sent_at,
        ),
        claimed_by=null(),
        lease_until=null(),
        claim_token=null(),
        updated_at=bindparam("now"),
    )
)


def release_expired_claims(now: datetime, batch: int) -> list[tuple[int, int]]:
    """Up to `batch` messages whose claim's lease has passed (their worker died, or hung past its job's
    timeout) -> pending, in the caller's transaction: back in line, to be sent again. Their send is in
    doubt: the provider may have taken it. Returns `(id, campaign_id)` of each."""
    picked = (
        select(_M.c.id)
        .where(_is(_M.c.status, MessageStatus.SENDING), _M.c.lease_until < now)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    rows = db.session.execute(
        update(_M)
        .where(_M.c.id.in_(picked.scalar_subquery()), _M.c.status == MessageStatus.SENDING, _M.c.lease_until < now)
        .values(status=MessageStatus.PENDING, claimed_by=null(), lease_until=null(), claim_token=null(), updated_at=now)
        .returning(_M.c.id, _M.c.campaign_id)
    ).all()
    return [(row.id, row.campaign_id) for row in rows]


def unqueue_lost(jobs: list[tuple[int, int]], now: datetime) -> int:
    """Queued messages whose job Redis no longer has (`(id, job_seq)` pairs) -> pending, in the caller's
    transaction: back in line for the next refill, which queues them with a new job. Returns how many."""
    if not jobs:
        return 0
    return db.session.execute(
        update(_M)
        .where(tuple_(_M.c.id, _M.c.job_seq).in_(jobs), _M.c.status == MessageStatus.QUEUED)
        .values(status=MessageStatus.PENDING, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount


_MESSAGES = OutboundMessage.__table__
_BY_PROVIDER_ID = and_(
    _MESSAGES.c.provider == bindparam("by_provider"),
    _MESSAGES.c.provider_message_id == bindparam("by_provider_message_id"),
)


@functools.cache
def _receipt_move(target: str, read: bool):
    """The one UPDATE a receipt meaning `target` makes (Core, built once per kind: webhooks apply thousands a
    second): the status moves where the table allows; a `read` receipt also sets `read_at`, once, on a
    message it leaves delivered (one that was delivered already included)."""
    moves = _MESSAGES.c.status.in_(sources(MESSAGE_TRANSITIONS, target))
    values = {
        "status": target,
        "updated_at": bindparam("now"),
        "error_code": func.coalesce(bindparam("error_code"), _MESSAGES.c.error_code),
        "error_class": func.coalesce(bindparam("error_class"), _MESSAGES.c.error_class),
        "last_error": func.coalesce(bindparam("error"), _MESSAGES.c.last_error),
    }
    condition = moves
    if target == MessageStatus.DELIVERED:
        delivered_at = func.coalesce(_MESSAGES.c.delivered_at, bindparam("now"))
        values["delivered_at"] = case((moves, delivered_at), else_=_MESSAGES.c.delivered_at) if read else delivered_at
    if read:
        unread = and_(_MESSAGES.c.status == MessageStatus.DELIVERED, _MESSAGES.c.read_at.is_(None))
        condition = or_(moves, unread)
        values["status"] = case((moves, target), else_=_MESSAGES.c.status)
        values["read_at"] = func.coalesce(_MESSAGES.c.read_at, bindparam("now"))
    return update(_MESSAGES).where(_BY_PROVIDER_ID, condition).values(**values)


@functools.cache
def _receipt_apply(target: str, read: bool):
    """PostgreSQL: the receipt's UPDATE and the look for its message in one statement, so both see the same
    commits. (As two statements, a send's record committing between them made the receipt find the message
    it had not moved: answered "unchanged", and kept nowhere.)"""
    moved = _receipt_move(target, read).returning(_MESSAGES.c.id).cte("moved")
    return select(
        select(func.count()).select_from(moved).scalar_subquery().label("moved"),
        exists().where(_BY_PROVIDER_ID).label("found"),
    )


_RECEIPT_FINDS = select(exists().where(_BY_PROVIDER_ID))


def apply_receipt(
    provider: str,
    provider_message_id: str,
    status: str,
    read: bool = False,
    error_code: str | None = None,
    error: str | None = None,
    error_class: str | None = None,
) -> bool | None:
    """A delivery receipt, in the caller's transaction: the message with this provider id moves to
    `status` if the table allows it from where it is (never a step back), and a `read` receipt also sets
    `read_at` on a delivered message; a failure's `error_class` (permanent or transient) decides whether
    retry-failed sends it again. True when it changed the message, False when the message took
    nothing (a repeat, a late or out-of-order receipt), None when no message has this provider id (as the
    statement saw the database: the caller keeps the receipt, and looks again once it has)."""
    connection = db.session.connection()
    key = {"by_provider": provider, "by_provider_message_id": provider_message_id}
    params = {**key, "now": clock.now(), "error_code": error_code, "error": error, "error_class": error_class}
    if connection.dialect.name == "postgresql":
        moved, found = connection.execute(_receipt_apply(status, read), params).one()
    else:  # SQLite takes one writer at a time: nothing commits between the two statements
        moved = connection.execute(_receipt_move(status, read), params).rowcount
        found = bool(moved) or bool(connection.scalar(_RECEIPT_FINDS, key))
    if moved:
        return True
    return False if found else None


def hold_for_provider(
    provider: str, provider_message_id: str, until: datetime, error_code: str | None, error: str | None
) -> int | None:
    """A failed receipt saying the provider held the message back to be tried later (WhatsApp 131049), in the
    caller's transaction: the sent message with this provider id goes back to `pending` until `until`, if it
    was never held before and its campaign is not canceled; a finished campaign goes back to `sending` (it
    has a message to send again). Returns the campaign's id, or None when it held nothing (the caller then
    applies the receipt as the failure it is)."""
    now = clock.now()
    campaign_open = select(_C.c.id).where(_C.c.id == _M.c.campaign_id, _C.c.status != CampaignStatus.CANCELED).exists()
    held = db.session.execute(
        update(_M)
        .where(
            _M.c.provider == provider,
            _M.c.provider_message_id == provider_message_id,
            _M.c.status == MessageStatus.SENT,
            _M.c.provider_held_at.is_(None),
            campaign_open,
        )
        .values(
            status=MessageStatus.PENDING,
            not_before=until,
            provider_held_at=now,
            # Sent again later under a new provider id; the old one's late or repeated receipts then find
            # nothing (kept, and aged out), never the message while it is sent again. Its `sent_at` is that
            # of its next send (an SMS fallback's not-delivered window counts from it; the cap counts it then).
            provider_message_id=None,
            sent_at=None,
            updated_at=now,
            error_code=error_code,
            error_class=ErrorClass.TRANSIENT,
            last_error=error,
        )
        .returning(_M.c.campaign_id)
    ).scalar()
    if held is not None:
        reopen_for_retry(held)
    return held


# --- customer imports run as jobs (app.customers.import_jobs) ---

_IMPORTS = CustomerImport.__table__


def start_import(import_id: int) -> bool:
    """Queued (or running, for a run that resumes after a crash) -> running, counting the run, in the
    caller's transaction. True when this call made the move (False: done, failed or unknown)."""
    return (
        db.session.execute(
            update(_IMPORTS)
            .where(
                _IMPORTS.c.id == import_id,
                _IMPORTS.c.status.in_(sources(IMPORT_TRANSITIONS, ImportStatus.RUNNING)),
            )
            .values(status=ImportStatus.RUNNING, attempts=_IMPORTS.c.attempts + 1, updated_at=clock.now())
        ).rowcount
        == 1
    )


def end_import(import_id: int, status: str, reason: str | None = None) -> bool:
    """Running -> done or failed (`status`), with its reason, in the caller's transaction. True when this
    call made the move."""
    now = clock.now()
    return (
        db.session.execute(
            update(_IMPORTS)
            .where(_IMPORTS.c.id == import_id, _IMPORTS.c.status.in_(sources(IMPORT_TRANSITIONS, status)))
            .values(status=status, status_reason=reason, finished_at=now, updated_at=now)
        ).rowcount
        == 1
    )
