"""Campaign and message statuses: the transitions allowed between them, and the one way each happens.

Every status change is a conditional UPDATE that names the statuses it may come from (taken from the
tables below), so two workers, a webhook and an operator acting at once cannot undo each other: the
second finds the row no longer in a state it may leave, and changes nothing. docs/architecture.md shows
the tables; a test checks that every function here moves only along them.
"""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import ColumnElement, String, and_, bindparam, exists, func, or_, select, update

from app import clock
from app.extensions import db
from app.messaging import stats
from app.messaging.recipients import NewRows
from app.models import Campaign, CampaignStatus, MessageStatus, OutboundMessage

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
    # An attempt's outcome; one that RQ retries, or that a paused campaign holds, leaves the message
    # pending. A campaign's cancel cancels it.
    MessageStatus.PENDING: frozenset(
        {MessageStatus.PENDING, MessageStatus.SENT, MessageStatus.FAILED, MessageStatus.CANCELED}
    ),
    # The provider's receipts. Never a step back: a late `sent` after `delivered`, or a repeated receipt,
    # changes nothing (a `read` one only sets `read_at` on a delivered message).
    MessageStatus.SENT: frozenset({MessageStatus.DELIVERED, MessageStatus.UNDELIVERED, MessageStatus.FAILED}),
    MessageStatus.DELIVERED: frozenset(),
    # retry-failed: a transient failure is tried again, with fresh retries.
    MessageStatus.UNDELIVERED: frozenset({MessageStatus.PENDING}),
    MessageStatus.FAILED: frozenset({MessageStatus.PENDING}),
    # The record of an attempt that was in flight when its campaign was canceled, and that the provider
    # took: the message did go out, and says so.
    MessageStatus.CANCELED: frozenset({MessageStatus.SENT}),
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


def cancel(campaign_id: int) -> int | None:
    """Draft, scheduled, sending or paused -> canceled, and its pending messages canceled in one UPDATE,
    in the caller's transaction. Returns how many messages were canceled, or None when the campaign did
    not move.

    The UPDATE waits for the rows that send jobs hold locked (a send in flight) and then sees their
    record: a message the provider took stays `sent`, one whose attempt failed and was left pending for
    a retry is canceled."""
    if not move_campaign(
        campaign_id, CampaignStatus.CANCELED, Campaign.status.in_(CampaignStatus.CANCELABLE), status_reason=None
    ):
        return None
    return db.session.execute(
        update(OutboundMessage)
        .where(OutboundMessage.campaign_id == campaign_id, OutboundMessage.status == MessageStatus.PENDING)
        .values(status=MessageStatus.CANCELED, updated_at=clock.now())
        .execution_options(synchronize_session=False)
    ).rowcount


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
    the caller's transaction; returns how many and their id range (for queueing them). Their provider
    and provider id are cleared: the new attempt records its own, and a late receipt for the old id finds
    no message to change (it is kept, unmatched)."""
    stmt = (
        update(OutboundMessage)
        .where(
            OutboundMessage.campaign_id == campaign_id,
            OutboundMessage.status.in_((MessageStatus.FAILED, MessageStatus.UNDELIVERED)),
            retryable,
        )
        .values(
            status=MessageStatus.PENDING,
            retry_count=0,
            provider=None,
            provider_message_id=None,
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


def start_due_campaign(campaign_id: int, now: datetime | None = None) -> bool:
    """Scheduled -> sending once `scheduled_at` has come, and commit: a trigger that fires twice, early, or
    for an old time moves nothing. True when this call made the move."""
    now = now or clock.now()
    moved = move_campaign(
        campaign_id, CampaignStatus.SENDING, Campaign.status == CampaignStatus.SCHEDULED, Campaign.scheduled_at <= now
    )
    db.session.commit()
    return moved


# The campaign's pending message with the highest id, if any. Sends go out roughly in id order, and the
# index range of its pending messages fills from the bottom with entries of messages already sent
# (dead until vacuum), so the check reads the range from the top. `EXISTS` reads it from the bottom
# (PostgreSQL drops an ORDER BY inside EXISTS): at 90% of a 100k campaign it made the send job's
# second round trip 1.3 ms instead of 0.8, and 9 ms when stale statistics chose a sequential scan.
LAST_PENDING = (
    select(OutboundMessage.id)
    .where(OutboundMessage.campaign_id == bindparam("campaign_id"), OutboundMessage.status == MessageStatus.PENDING)
    .order_by(OutboundMessage.id.desc())
    .limit(1)
)


def pending_exists(connection, campaign_id: int) -> bool:
    """Whether the campaign has a pending message, as `connection` sees it."""
    return connection.scalar(LAST_PENDING, {"campaign_id": campaign_id}) is not None


def pending_exists_now(campaign_id: int) -> bool:
    """Whether the campaign has a pending message, read outside any transaction (one round trip)."""
    with db.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        return pending_exists(conn, campaign_id)


def _has_messages(campaign_id: int, statuses: tuple[str, ...] | None = None) -> bool:
    conditions = [OutboundMessage.campaign_id == campaign_id]
    if statuses:
        conditions.append(OutboundMessage.status.in_(statuses))
    return bool(db.session.scalar(select(exists().where(and_(*conditions)))))


def finish_campaign(campaign_id: int, pending_checked: bool = False) -> str | None:
    """If the `sending` campaign has no pending message left, end it: `sent` when a provider accepted at
    least one message, else `failed` with the reason. Returns the new status, or None when nothing changed.

    Call after the commit of the message that may have been the last (`pending_checked` when the caller
    has just seen, after that commit, that nothing is pending). Safe when several workers finish the last
    messages at once: the campaign row is locked before the final count, so the count sees every commit
    that came before, and only one caller moves it out of `sending`. The one that does recounts the
    campaign's stats from its rows (`stats.recount`).
    """
    if not pending_checked and pending_exists_now(campaign_id):
        return None  # the common case: one indexed lookup, no lock, no transaction
    locked = db.session.scalar(
        select(Campaign.id)
        .where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.SENDING)
        .with_for_update()
    )
    if locked is None or pending_exists(db.session, campaign_id):
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


# An attempt's outcome (`sent`, `failed`, or still `pending` with a retry used). Only a pending message
# takes one (plain comparisons keep the statement's SQL fixed, which the send job's store compiles once):
# a record retried after its row lock was lost (a database outage) must not overwrite a later attempt's.
# The one exception is a message canceled meanwhile that the provider took: it did go out, and its
# record says so (a cancel waits for the row lock of a send in flight, so only a lost lock gets here).
RECORD_ATTEMPT = (
    update(OutboundMessage)
    .where(
        OutboundMessage.id == bindparam("message_id"),
        or_(
            OutboundMessage.status == MessageStatus.PENDING,
            and_(
                OutboundMessage.status == MessageStatus.CANCELED,
                bindparam("new_status", type_=String) == MessageStatus.SENT,
            ),
        ),
    )
    .values(
        status=bindparam("new_status"),
        rendered_content=bindparam("body"),
        segments=bindparam("segments"),
        # A success keeps the last error, its code and class, for the record.
        last_error=func.coalesce(bindparam("error"), OutboundMessage.last_error),
        error_code=func.coalesce(bindparam("error_code"), OutboundMessage.error_code),
        error_class=func.coalesce(bindparam("error_class"), OutboundMessage.error_class),
        retry_count=bindparam("retries_used"),
        provider=func.coalesce(bindparam("provider"), OutboundMessage.provider),
        provider_message_id=func.coalesce(bindparam("provider_message_id"), OutboundMessage.provider_message_id),
        updated_at=bindparam("now"),
    )
)


# A message held by quiet hours: it stays pending, with the time it may go and no retry used. Only a
# pending one is held (the send job holds its row lock; the condition keeps a record retried after a lost
# lock from touching a later outcome). Not a status change; `updated_at` moves, so the reconciler sees it
# was just handled (and leaves it until `not_before` anyway, `app.messaging.reconcile`).
HOLD_UNTIL = (
    update(OutboundMessage)
    .where(OutboundMessage.id == bindparam("message_id"), OutboundMessage.status == MessageStatus.PENDING)
    .values(not_before=bindparam("not_before"), updated_at=bindparam("now"))
)


_MESSAGES = OutboundMessage.__table__
_BY_PROVIDER_ID = and_(
    _MESSAGES.c.provider == bindparam("by_provider"),
    _MESSAGES.c.provider_message_id == bindparam("by_provider_message_id"),
)


@functools.cache
def _receipt_move(target: str):
    """The UPDATE a receipt meaning `target` makes (Core, built once: webhooks apply thousands a second)."""
    return (
        update(_MESSAGES)
        .where(_BY_PROVIDER_ID, _MESSAGES.c.status.in_(sources(MESSAGE_TRANSITIONS, target)))
        .values(
            status=target,
            updated_at=bindparam("now"),
            error_code=func.coalesce(bindparam("error_code"), _MESSAGES.c.error_code),
            error_class=func.coalesce(bindparam("error_class"), _MESSAGES.c.error_class),
            last_error=func.coalesce(bindparam("error"), _MESSAGES.c.last_error),
        )
    )


_RECEIPT_READ = (
    update(_MESSAGES)
    .where(_BY_PROVIDER_ID, _MESSAGES.c.status == MessageStatus.DELIVERED, _MESSAGES.c.read_at.is_(None))
    .values(read_at=bindparam("now"), updated_at=bindparam("now"))
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
    nothing (a repeat, a late or out-of-order receipt), None when no message has this provider id."""
    connection = db.session.connection()
    key = {"by_provider": provider, "by_provider_message_id": provider_message_id}
    params = {**key, "now": clock.now(), "error_code": error_code, "error": error, "error_class": error_class}
    moved = connection.execute(_receipt_move(status), params).rowcount
    if read:
        moved += connection.execute(_RECEIPT_READ, params).rowcount
    if moved:
        return True
    return False if connection.scalar(_RECEIPT_FINDS, key) else None
