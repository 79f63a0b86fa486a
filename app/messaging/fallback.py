"""SMS fallback: a WhatsApp campaign's SMS to the customers its WhatsApp message could not reach.

A WhatsApp campaign may carry `sms_fallback`: `{"base_template", "on", "not_delivered_within"}`. What
triggers it (`on`):
- `undeliverable`: WhatsApp refused the number for good (131026), at the send or in a failed status;
- `window_closed`: a text outside the 24-hour customer service window (131047);
- `not_delivered`: no `delivered` status within `not_delivered_within` of the provider taking it (still
  `sent`, or failed for another reason than the customer's opt-out).
A customer who stopped WhatsApp marketing (131050) gets no fallback: they asked for less marketing, not for
another channel.

A fallback is a message of its own in the same campaign (`fallback_for` names the WhatsApp message it
replaces), created pending by one `INSERT ... SELECT ... ON CONFLICT DO NOTHING`: one per WhatsApp message
whatever triggers it how often (`uq_outbound_messages_fallback_for`). From then on it is a message like any
other: the campaign's window queues it, the send job sends it by SMS with this template (the SMS provider,
its throughput limit, quiet hours, retries), pause, resume, cancel and retry-failed act on it. A customer
opted out of SMS, or held back by FREQUENCY_CAP (their campaign's own WhatsApp message left out of the
count), gets a fallback row `canceled` with that reason (`opted_out`, `frequency_cap`), counted apart in the
stats. A fallback whose WhatsApp message is delivered after all before it goes is canceled by its claim
(`delivered_first`); one that went already stays, and the late delivery is counted
(`delivered_after_fallback`).

The send job and the receipts trigger a fallback as soon as they record the failure; a not-delivered one is
looked for by a job scheduled for when the oldest window may pass, and by the reconciler on every pass
(`sweep`), which also makes up for a trigger lost between a record and its fallback. A campaign with a
fallback does not end while one of its WhatsApp messages is `sent` without a fallback and could still
trigger one (`lifecycle.may_still_trigger_fallback`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, and_, case, exists, false, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased

from app import clock, metrics
from app.audiences import caps
from app.extensions import db
from app.messaging import lifecycle
from app.messaging.fallback_spec import NOT_DELIVERED, triggers_on, within
from app.messaging.providers import whatsapp_cloud
from app.messaging.send import window
from app.models import (
    Campaign,
    CampaignStatus,
    Channel,
    Customer,
    CustomerOptOut,
    ErrorClass,
    MessageStatus,
    OutboundMessage,
)
from app.queues import get_control_queue

log = logging.getLogger(__name__)

# The `last_error` of a fallback canceled because its WhatsApp message was delivered before it went, or
# skipped before it was queued.
DELIVERED_FIRST = "delivered on WhatsApp before its SMS fallback went"
SKIPPED_OPTED_OUT = "the customer opted out of sms: no fallback"
SKIPPED_CAPPED = "FREQUENCY_CAP held the fallback back"
# Seconds by which the scheduled checks of one campaign are grouped (one job per campaign per bucket).
CHECK_BUCKET = 10
CHECK_JOB = "app.messaging.jobs.check_fallbacks"


def reason_for(row: dict, status: str, error_code: str | None) -> str | None:
    """What a send's outcome triggers: the trigger's name when the message is a WhatsApp one (not itself a
    fallback) of a campaign whose fallback is on for it, and it failed with a code that means it; else None."""
    spec = row.get("sms_fallback")
    if not spec or row.get("fallback_for") is not None or row["channel"] != Channel.WHATSAPP:
        return None
    if status != MessageStatus.FAILED:
        return None
    trigger = whatsapp_cloud.FALLBACK_TRIGGERS.get(error_code or "")
    return trigger if triggers_on(spec, trigger) else None


def _insert(campaign: Campaign, replaced, where: ColumnElement[bool], now: datetime, limit: int | None = None):
    """`INSERT ... SELECT` of a fallback for each WhatsApp message of `campaign` (`replaced`, an alias of the
    messages) matching `where`: pending, or canceled at once for a customer opted out of SMS or held back by
    FREQUENCY_CAP. A message with a fallback already gets none. Returns the new rows' statuses."""
    opted_out = exists().where(
        CustomerOptOut.customer_id == replaced.customer_id, CustomerOptOut.channel == Channel.SMS
    )
    cap = caps.cap_for(campaign)
    capped = false() if cap is None else caps.capped(cap, now, besides_campaign=campaign.id)
    # Why it is skipped (its error code), or null: it goes.
    code = case((opted_out, "opted_out"), (capped, "frequency_cap"), else_=None)
    skipped = code.is_not(None)
    error = case((opted_out, SKIPPED_OPTED_OUT), (capped, SKIPPED_CAPPED), else_=None)
    rows = (
        select(
            replaced.campaign_id,
            replaced.customer_id,
            case((skipped, MessageStatus.CANCELED), else_=MessageStatus.PENDING),
            literal(0),
            replaced.id,
            code,
            error,
            case((skipped, ErrorClass.PERMANENT), else_=None),
            literal(now, OutboundMessage.created_at.type),
            literal(now, OutboundMessage.updated_at.type),
        )
        .select_from(replaced)
        .join(Customer, Customer.id == replaced.customer_id)
        .where(replaced.campaign_id == campaign.id, replaced.fallback_for.is_(None), where)
        .where(~lifecycle.replaced_by_fallback(replaced))
        .order_by(replaced.id)
    )
    if limit is not None:
        rows = rows.limit(limit)
    columns = [
        "campaign_id",
        "customer_id",
        "status",
        "retry_count",
        "fallback_for",
        "error_code",
        "last_error",
        "error_class",
        "created_at",
        "updated_at",
    ]
    insert = postgresql.insert if db.session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(OutboundMessage).from_select(columns, rows).on_conflict_do_nothing()
    made = db.session.execute(statement.returning(OutboundMessage.status, OutboundMessage.error_code)).all()
    metrics.count_fallbacks(
        "made" if status == MessageStatus.PENDING else f"skipped_{error_code}" for status, error_code in made
    )
    return [status for status, _ in made]


def _open_campaign(campaign_id: int) -> Campaign | None:
    """The campaign, locked, if it has a fallback and is not canceled."""
    return db.session.scalar(
        select(Campaign)
        .where(
            Campaign.id == campaign_id, Campaign.sms_fallback.is_not(None), Campaign.status != CampaignStatus.CANCELED
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def _after_insert(campaign_id: int, statuses: list[str]) -> bool:
    """In the caller's transaction: a finished campaign with a new pending fallback goes back to sending.
    True when a fallback waits to be sent (the caller refills the window after its commit)."""
    if MessageStatus.PENDING not in statuses:
        return False
    lifecycle.reopen_for_retry(campaign_id)
    return True


def trigger(message_id: int, reason: str) -> bool:
    """The WhatsApp message's failure triggers its fallback (`reason`): created if its campaign's fallback is
    on for it and it has none yet, and the campaign's window refilled. Commits; True when one was created."""
    campaign_id = db.session.scalar(select(OutboundMessage.campaign_id).where(OutboundMessage.id == message_id))
    campaign = None if campaign_id is None else _open_campaign(campaign_id)
    if campaign is None or not triggers_on(campaign.sms_fallback, reason):
        db.session.commit()
        return False
    replaced = aliased(OutboundMessage)
    failed = replaced.status.in_((MessageStatus.FAILED, MessageStatus.UNDELIVERED))
    statuses = _insert(campaign, replaced, and_(replaced.id == message_id, failed), clock.now())
    refill = _after_insert(campaign.id, statuses)
    db.session.commit()
    if statuses:
        log.debug("sms fallback", extra={"campaign_id": campaign.id, "message_id": message_id, "reason": reason})
    if refill:
        window.refill(campaign.id)
    return bool(statuses)


def trigger_by_provider_id(provider: str, provider_message_id: str, reason: str) -> bool:
    """`trigger` for the message a failed receipt names."""
    message_id = db.session.scalar(
        select(OutboundMessage.id).where(
            OutboundMessage.provider == provider, OutboundMessage.provider_message_id == provider_message_id
        )
    )
    return message_id is not None and trigger(message_id, reason)


def _due(replaced, spec: dict, now: datetime) -> ColumnElement[bool]:
    """The WhatsApp messages whose fallback is due now and was not created (a trigger lost between a record
    and its fallback, or a not-delivered window that has passed)."""
    due = []
    codes = whatsapp_cloud.fallback_codes(spec)
    if codes:
        due.append(and_(replaced.status == MessageStatus.FAILED, replaced.error_code.in_(codes)))
    if triggers_on(spec, NOT_DELIVERED):
        due.append(
            and_(
                replaced.status.in_((MessageStatus.SENT, MessageStatus.FAILED, MessageStatus.UNDELIVERED)),
                replaced.sent_at.is_not(None),
                replaced.sent_at <= now - within(spec),
                or_(replaced.error_code.is_(None), replaced.error_code != str(whatsapp_cloud.OPTED_OUT)),
            )
        )
    return or_(*due) if due else false()


def check(campaign_id: int, batch: int | None = None) -> int:
    """Create the campaign's due fallbacks (`_due`), a batch per transaction, and refill its window; commits.
    Returns how many were created."""
    batch = batch or current_app.config["RECONCILE_BATCH_SIZE"]
    total = 0
    refill = False
    while True:
        campaign = _open_campaign(campaign_id)
        if campaign is None:
            db.session.commit()
            break
        replaced = aliased(OutboundMessage)
        statuses = _insert(campaign, replaced, _due(replaced, campaign.sms_fallback, clock.now()), clock.now(), batch)
        refill = _after_insert(campaign_id, statuses) or refill
        db.session.commit()
        total += len(statuses)
        if len(statuses) < batch:
            break
    if total:
        log.info("sms fallbacks due", extra={"campaign_id": campaign_id, "created": total})
    if refill:
        window.refill(campaign_id)
    return total


def sweep() -> int:
    """For the reconciler: `check` every campaign with a fallback that is sending or paused."""
    ids = db.session.scalars(
        select(Campaign.id).where(
            Campaign.status.in_((CampaignStatus.SENDING, CampaignStatus.PAUSED)), Campaign.sms_fallback.is_not(None)
        )
    ).all()
    db.session.commit()
    return sum(check(campaign_id) for campaign_id in ids)


_scheduled: dict[int, int] = {}


def schedule_check(campaign_id: int, sent_at: datetime, spec: dict) -> None:
    """A check of the campaign's fallbacks when the not-delivered window of a message sent at `sent_at` passes:
    one job per campaign per `CHECK_BUCKET` seconds (the reconciler checks anyway, should Redis lose it)."""
    if not triggers_on(spec, NOT_DELIVERED):
        return
    due = sent_at + within(spec)
    bucket = -(-int(due.timestamp()) // CHECK_BUCKET) * CHECK_BUCKET
    if _scheduled.get(campaign_id) == bucket:
        return
    delay = max(1.0, bucket - clock.now().timestamp())
    try:
        get_control_queue().enqueue_in(
            timedelta(seconds=delay),
            CHECK_JOB,
            args=(campaign_id,),
            job_id=f"fallback_check-{campaign_id}-{bucket}",
            result_ttl=0,
            description=f"sms fallbacks due in campaign {campaign_id}",
        )
    except RedisError:
        log.warning("could not schedule a fallback check", extra={"campaign_id": campaign_id}, exc_info=True)
        return
    if len(_scheduled) > 10_000:
        _scheduled.clear()
    _scheduled[campaign_id] = bucket
