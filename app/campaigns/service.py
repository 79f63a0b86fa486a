"""Campaigns: create, edit, schedule, send, preview, and the delivery controls (pause, resume, cancel,
retry the failed ones). One transaction per call; jobs and triggers are handed to Redis only after the
commit."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

from flask import current_app
from sqlalchemy import ColumnElement, and_, func, select

from app import clock
from app.audiences import caps, segments
from app.customers import optouts
from app.customers.service import get_customer
from app.database import statement_budget
from app.errors import ConflictError, NotFoundError, ValidationFailed
from app.extensions import db
from app.links import shorten
from app.links.clicks import link_counts
from app.messaging import fallback_spec, lifecycle, recipient_batches, recipients, triggers, variants
from app.messaging.segments import GSM_7, UCS_2, encode_info, measure
from app.messaging.send import window
from app.messaging.stats import campaign_stats, delivery_times, stats_for
from app.messaging.templates import (
    CHANNEL_LIMITS,
    compile_template,
    fixed_text,
    over_limit,
    render,
    unknown_placeholders,
)
from app.models import Campaign, CampaignStatus, Channel, Customer, ErrorClass, MessageStatus, OutboundMessage
from app.pagination import paginate

log = logging.getLogger(__name__)

# The most unknown ids a 422 lists in `missing_customer_ids`.
MAX_LISTED_IDS = 1000


def get_campaign(campaign_id: int, lock: bool = False) -> Campaign:
    stmt = select(Campaign).where(Campaign.id == campaign_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    campaign = db.session.scalar(stmt)
    if campaign is None:
        raise NotFoundError(f"campaign {campaign_id} not found")
    return campaign


def with_stats(campaign: Campaign) -> Campaign:
    """`campaign` with its message `stats` attached, for the detail view; an SMS campaign also with its
    `template_encoding`, one with an SMS fallback with its `sms_fallback_encoding`."""
    campaign.stats = _with_costs(campaign_stats(campaign.id), campaign.channel)
    sending = campaign.status == CampaignStatus.SENDING and campaign.stats["queued"]
    campaign.queued_beside_others = window.queued_before(campaign.id, campaign.stats["queued"]) if sending else None
    if campaign.channel == Channel.SMS:
        campaign.template_encoding = template_encoding(campaign.base_template)
    if campaign.sms_fallback:
        campaign.sms_fallback_encoding = template_encoding(campaign.sms_fallback["base_template"])
    return campaign


def _with_costs(stats: dict, channel: str) -> dict:
    """`stats` with each A/B variant's `cost`: its accepted SMS segments x SMS_SEGMENT_PRICE (null for
    WhatsApp, or without a price)."""
    price = current_app.config["SMS_SEGMENT_PRICE"]
    for variant in stats["variants"].values():
        variant["cost"] = price * variant["segments_sent"] if channel == Channel.SMS and price is not None else None
    return stats


def delivery_seconds(campaign_id: int) -> dict:
    """How long the campaign's delivered messages took from sent to delivered: median and 95th percentile."""
    get_campaign(campaign_id)
    return delivery_times(campaign_id)


def template_encoding(template: str) -> dict:
    """The encoding and segments of the template's fixed text (placeholders removed: what every message
    carries whoever it goes to), with a `warning` when that alone makes every message UCS-2 or longer than
    one SMS, and null otherwise. A warning, never an error: the business may mean it, and pays for it.
    Customers' values can only add to this (the preview and the estimate count them)."""
    info = encode_info(fixed_text(template))
    warnings = []
    if info.encoding == UCS_2:
        shown = " ".join(info.non_gsm_characters[:10])
        warnings.append(
            f"{shown} {'is' if len(info.non_gsm_characters) == 1 else 'are'} not in the GSM-7 alphabet: every "
            "message goes as UCS-2, 70 characters per SMS instead of 160 (67 instead of 153 per part)"
        )
    if info.segments > 1:
        warnings.append(f"the fixed text alone takes {info.segments} SMS segments per message")
    return {**info.as_dict(), "warning": "; ".join(warnings) or None}


def check_template(template: str, channel: str, field: str = "base_template") -> None:
    """422 naming any placeholder rendering cannot fill, or a template over the channel's limit (`field`:
    where the template is in the request)."""
    errors = []
    unknown = unknown_placeholders(template)
    if unknown:
        errors.append(
            f"unknown placeholder{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            "use {first_name}, {last_name}, {preferred_product}, {location} or {attributes.NAME}, "
            "each perhaps with a fallback: {first_name|there}"
        )
    too_long = over_limit(template, channel)
    if too_long:
        errors.append(too_long)
    if errors:
        raise ValidationFailed(f"{field}: " + "; ".join(errors), {field: errors})


def _check_schedule(at: datetime) -> None:
    if at <= clock.now():
        raise ValidationFailed(
            f"scheduled_at: {at.isoformat()} is in the past", {"scheduled_at": ["must be in the future"]}
        )


def _check_whatsapp_template(template: Mapping | None, channel: str) -> None:
    if template is not None and channel != Channel.WHATSAPP:
        error = "only a whatsapp campaign sends a WhatsApp template"
        raise ValidationFailed(f"whatsapp_template: {error}", {"whatsapp_template": [error]})


def _checked_fallback(spec: Mapping | None, channel: str) -> dict | None:
    """The `sms_fallback` as stored (`fallback_spec.normalized`), or a 422 naming what is wrong with it."""
    if spec is None:
        return None
    if channel != Channel.WHATSAPP:
        error = "only a whatsapp campaign falls back to sms"
        raise ValidationFailed(f"sms_fallback: {error}", {"sms_fallback": [error]})
    check_template(spec["base_template"], Channel.SMS, "sms_fallback.base_template")
    try:
        return fallback_spec.normalized(dict(spec))
    except fallback_spec.FallbackError as exc:
        raise ValidationFailed(str(exc), {f"sms_fallback.{exc.field}": [exc.message]}) from None


def _checked_variants(spec: list | None, channel: str) -> list[dict] | None:
    """The `variants` as stored (`variants.normalized`), or a 422 naming what is wrong with them."""
    if spec is None:
        return None
    try:
        stored = variants.normalized([dict(variant) for variant in spec], channel)
    except variants.VariantError as exc:
        raise ValidationFailed(str(exc), {exc.field: [exc.message]}) from None
    for index, variant in enumerate(stored):
        check_template(variant["base_template"], channel, f"variants.{index}.base_template")
    return stored


def create_campaign(data: Mapping) -> Campaign:
    check_template(data["base_template"], data["channel"])
    _check_whatsapp_template(data.get("whatsapp_template"), data["channel"])
    if "sms_fallback" in data:
        data = {**data, "sms_fallback": _checked_fallback(data["sms_fallback"], data["channel"])}
    if "variants" in data:
        data = {**data, "variants": _checked_variants(data["variants"], data["channel"])}
    scheduled_at = data.get("scheduled_at")
    if scheduled_at is not None:
        _check_schedule(scheduled_at)
    campaign = Campaign(**data, status=CampaignStatus.SCHEDULED if scheduled_at else CampaignStatus.DRAFT)
    db.session.add(campaign)
    db.session.commit()
    if scheduled_at:
        triggers.sync_dispatch(campaign.id, scheduled_at)
    return with_stats(campaign)


def update_campaign(campaign_id: int, data: Mapping) -> Campaign:
    """Edit a draft or scheduled campaign. A new `scheduled_at` reschedules it; `null` returns it to draft."""
    campaign = get_campaign(campaign_id, lock=True)
    if campaign.status not in CampaignStatus.EDITABLE:
        db.session.rollback()
        raise ConflictError(
            f"campaign {campaign_id} is {campaign.status}; only draft or scheduled campaigns can be changed",
            campaign_status=campaign.status,
        )
    channel = data.get("channel", campaign.channel)
    check_template(data.get("base_template", campaign.base_template), channel)
    _check_whatsapp_template(data.get("whatsapp_template", campaign.whatsapp_template), channel)
    data = {
        **data,
        "sms_fallback": _checked_fallback(data.get("sms_fallback", campaign.sms_fallback), channel),
        "variants": _checked_variants(data.get("variants", campaign.variants), channel),
    }
    if data.get("scheduled_at") is not None:
        _check_schedule(data["scheduled_at"])
    for key, value in data.items():
        setattr(campaign, key, value)
    db.session.flush()
    if "scheduled_at" in data:
        lifecycle.set_schedule(campaign.id, campaign.scheduled_at)
    db.session.commit()
    db.session.refresh(campaign)
    if "scheduled_at" in data:
        triggers.sync_dispatch(campaign.id, campaign.scheduled_at)
    return with_stats(campaign)


def list_campaigns(
    page_size: int,
    page: int | None = None,
    cursor: str | None = None,
    status: str | None = None,
    channel: str | None = None,
) -> dict:
    """A page of campaigns, newest first, each with its stats (two queries for the whole page)."""
    stmt = select(Campaign)
    if status is not None:
        stmt = stmt.where(Campaign.status == status)
    if channel is not None:
        stmt = stmt.where(Campaign.channel == channel)
    listed = paginate(stmt, Campaign.id, "campaigns", page_size, page, cursor)
    stats = stats_for(campaign.id for campaign in listed["data"])
    for campaign in listed["data"]:
        campaign.stats = _with_costs(stats[campaign.id], campaign.channel)
    return listed


def list_messages(
    campaign_id: int, page_size: int, page: int | None = None, cursor: str | None = None, status: str | None = None
) -> dict:
    campaign = get_campaign(campaign_id)
    stmt = select(OutboundMessage).where(OutboundMessage.campaign_id == campaign_id)
    if status is not None:
        stmt = stmt.where(OutboundMessage.status == status)
    listed = paginate(stmt, OutboundMessage.id, "messages", page_size, page, cursor)
    for message in listed["data"]:
        message.channel = Channel.SMS if message.fallback_for is not None else campaign.channel
    return listed


def _ids_filter(customer_ids: list[int]) -> ColumnElement[bool]:
    """The customers a send to ids targets; 422 for ids of no customer or too many ids."""
    limit = current_app.config["MAX_SEND_IDS"]
    ids = sorted(set(customer_ids))
    if len(ids) > limit:
        raise ValidationFailed(
            f"customer_ids: {len(ids)} ids is over the limit of {limit}; send to an audience instead "
            '({"audience": {"all": true}} or {"audience": {"location": "..."}})',
            {"customer_ids": [f"at most {limit} ids"]},
        )
    found = set(db.session.scalars(select(Customer.id).where(Customer.id.in_(ids))))
    missing = [i for i in ids if i not in found]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ValidationFailed(
            f"customer_ids: no customer with id {shown}",
            {"customer_ids": [f"no customer with id {shown}"]},
            missing_customer_ids=missing[:MAX_LISTED_IDS],
        )
    return Customer.id.in_(ids)


def _audience_filter(customer_ids: list[int] | None, audience: Mapping | None) -> ColumnElement[bool]:
    """The customers a send or an estimate targets (a segment held until the commit)."""
    if customer_ids is not None:
        return _ids_filter(customer_ids)
    assert audience is not None
    return recipient_batches.audience_condition(recipient_batches.audience_spec(audience))


def _add_recipients(
    campaign: Campaign, customer_ids: list[int] | None, audience: Mapping | None, has_pending: bool
) -> recipient_batches.Added:
    """The messages of a send's recipients, in the request's transaction: all of them for ids, the first
    batches of an audience (`recipient_batches`; the campaign then records where the rest starts)."""
    if customer_ids is not None:
        where = _ids_filter(customer_ids)
        rows = recipients.create_pending_messages(
            campaign.id, where, campaign.channel, caps.cap_for(campaign), campaign.variants
        )
        # Read in the same transaction, after the insert: the opted-out among the ids it left out.
        return recipient_batches.Added(rows.count, optouts.count_opted_out(where, campaign.channel), rows.capped)
    if campaign.adding_after is not None:
        raise ConflictError(
            f"campaign {campaign.id} is still adding the recipients of an earlier send "
            f"({(campaign.last_send or {}).get('added', 0)} so far, `last_send` in its detail): send to another "
            "audience once it is done",
            campaign_status=campaign.status,
        )
    return recipient_batches.add_first(campaign, recipient_batches.audience_spec(audience), has_pending)


def _pending_count(campaign_id: int) -> int:
    return db.session.scalar(
        select(func.count()).where(
            OutboundMessage.campaign_id == campaign_id, OutboundMessage.status == MessageStatus.PENDING
        )
    )


def send_campaign(campaign_id: int, customer_ids: list[int] | None = None, audience: Mapping | None = None) -> dict:
    """Create the pending messages for the recipients, then queue them.

    Ids, and the first `RECIPIENT_BATCH` customers of an audience, get their messages in the request's
    transaction; a larger audience's rest is added batch by batch after the answer (`adding_recipients`).
    A campaign scheduled in the future only stores its recipients; its trigger queues them later. A campaign
    that starts now (draft, or scheduled and due) queues all its pending messages, one already sending
    queues only the rows this call created.
    """
    campaign = get_campaign(campaign_id, lock=True)  # serializes sends to one campaign
    try:
        if campaign.status not in CampaignStatus.SENDABLE:
            raise ConflictError(
                f"campaign {campaign_id} is {campaign.status}; only draft, scheduled or sending campaigns can be sent",
                campaign_status=campaign.status,
            )
        later = campaign.status == CampaignStatus.SCHEDULED and campaign.scheduled_at > clock.now()
        if later and audience is not None and "segment_id" in audience:
            # Evaluated when the campaign fires: who joins or leaves the segment meanwhile counts then.
            segments.keep_for_schedule(campaign, audience["segment_id"])
            db.session.commit()
            return {
                "campaign_id": campaign.id,
                "messages_queued": 0,
                "messages_left_for_reconciler": 0,
                "messages_scheduled": 0,
                "skipped_opted_out": 0,
                "skipped_frequency_cap": 0,
                "adding_recipients": False,
                "segment_id": audience["segment_id"],
                "segment_evaluated_at_fire": True,
                "status": campaign.status,
                "scheduled_at": campaign.scheduled_at,
            }
        starting = not later and campaign.status != CampaignStatus.SENDING
        # Recipients stored while it was scheduled go out with the new ones, and answer "something to send".
        stored = _pending_count(campaign.id) if starting else 0
        added = _add_recipients(campaign, customer_ids, audience, has_pending=bool(stored))
        if later:
            db.session.commit()
            if added.more:
                recipient_batches.enqueue(campaign.id, campaign.adding_after)
            return {
                "campaign_id": campaign.id,
                "messages_queued": 0,
                "messages_left_for_reconciler": 0,
                "messages_scheduled": added.created,
                "skipped_opted_out": added.skipped_opted_out,
                "skipped_frequency_cap": added.skipped_frequency_cap,
                "adding_recipients": added.more,
                "status": campaign.status,
                "scheduled_at": campaign.scheduled_at,
            }
        if starting:
            added_from_segment = segments.add_waiting_segment(campaign.id)  # a segment named while scheduled
            count = stored + added.created + added_from_segment
            if not count:
                if added.skipped_opted_out or added.skipped_frequency_cap:
                    raise ValidationFailed(
                        "every customer of the audience is opted out of "
                        f"{campaign.channel} or held back by the frequency cap: nothing to send",
                        skipped_opted_out=added.skipped_opted_out,
                        skipped_frequency_cap=added.skipped_frequency_cap,
                    )
                raise ValidationFailed("the audience matches no customer: nothing to send")
            lifecycle.start_sending(campaign.id)  # under the campaign's row lock: it moves
        else:
            count = added.created
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    if added.more:
        recipient_batches.enqueue(campaign.id, campaign.adding_after)
    if starting:
        triggers.sync_dispatch(campaign.id, None)
    lost = window.refill(campaign.id).lost
    return {
        "campaign_id": campaign.id,
        "messages_queued": count - lost,
        "messages_left_for_reconciler": lost,
        "skipped_opted_out": added.skipped_opted_out,
        "skipped_frequency_cap": added.skipped_frequency_cap,
        "adding_recipients": added.more,
        "status": CampaignStatus.SENDING,
    }


def preview(campaign_id: int, customer_id: int) -> dict:
    """The message the customer would get; for an SMS campaign also its encoding and segments."""
    campaign = get_campaign(campaign_id)
    customer = get_customer(customer_id)
    fields = {name: getattr(customer, name) for name in recipients.RENDER_FIELDS}
    template = campaign.base_template
    answer = {"campaign_id": campaign.id, "customer_id": customer.id}
    if campaign.variants:
        # The customer's own variant, and what each variant would send them.
        answer["variant"] = variants.choose(campaign.variants, campaign.id, customer.id)
        template = variants.named(campaign.variants, answer["variant"])["base_template"]
        answer["variants"] = [
            {"name": variant["name"], **_preview_for_channel(campaign, variant["base_template"], fields)}
            for variant in campaign.variants
        ]
    answer.update(_preview_for_channel(campaign, template, fields))
    if campaign.sms_fallback:
        sms = _preview(campaign, campaign.sms_fallback["base_template"], fields)
        answer["fallback"] = {**sms, **encode_info(sms["rendered_message"]).as_dict()}
    return answer


def _preview_for_channel(campaign: Campaign, template: str, fields: dict) -> dict:
    """`_preview`, with an SMS's encoding and segments."""
    answer = _preview(campaign, template, fields)
    if campaign.channel == Channel.SMS:
        answer.update(encode_info(answer["rendered_message"]).as_dict())
    return answer


def _preview(campaign: Campaign, template: str, fields: dict) -> dict:
    body = render(template, fields)
    links = []
    if campaign.track_links:
        shortener = shorten.sample(current_app)
        body, links = shortener.shorten(body), shortener.links
    return {"rendered_message": body, "links": links}


def estimate(campaign_id: int, customer_ids: list[int] | None = None, audience: Mapping | None = None) -> dict:
    """What `/send` with the same body would send now, and what it would cost; stores and queues nothing.

    The recipients are resolved as `/send` resolves them (the same 404, 409 and 422), less the customers
    already messaged in the campaign (a send would not add them again) and those an opt-out excludes.
    For SMS each one's message is rendered and counted, streamed from the database in chunks: memory stays
    flat however large the audience. A message over the SMS limit is counted in `too_long`, not in the
    segments: the send job fails it without sending it."""
    campaign = get_campaign(campaign_id)
    try:
        if campaign.status not in CampaignStatus.SENDABLE:
            raise ConflictError(
                f"campaign {campaign_id} is {campaign.status}; only draft, scheduled or sending campaigns can be "
                "sent, so estimated",
                campaign_status=campaign.status,
            )
        targeted = and_(_audience_filter(customer_ids, audience), recipients.not_yet_messaged(campaign.id))
        opt_out = recipients.opt_out_filter(campaign.channel)
        reachable = targeted if opt_out is None else and_(targeted, opt_out)
        cap = caps.cap_for(campaign)
        kept = reachable if cap is None else and_(reachable, caps.not_capped(cap))
        answer = {
            "campaign_id": campaign.id,
            "channel": campaign.channel,
            "skipped_opted_out": 0,
            "skipped_frequency_cap": 0,
            "segments": None,
            "by_encoding": None,
            "too_long": None,
            "cost": None,
            "currency": None,
        }
        if campaign.variants:
            answer["variants"] = [_estimate_variant(campaign, variant, kept) for variant in campaign.variants]
            answer["recipients"] = sum(variant["recipients"] for variant in answer["variants"])
            if campaign.channel == Channel.SMS:
                answer.update(_summed(answer["variants"]))
        elif campaign.channel != Channel.SMS:
            answer["recipients"] = recipients.count_customers(kept)
        else:
            answer.update(_count_sms(campaign.base_template, kept, campaign.track_links))
        if cap is not None:
            answer["skipped_frequency_cap"] = recipients.count_customers(and_(reachable, caps.capped(cap)))
        if opt_out is not None:
            answer["skipped_opted_out"] = (
                recipients.count_customers(targeted) - answer["recipients"] - answer["skipped_frequency_cap"]
            )
        answer["fallback"] = _fallback_estimate(campaign, kept)
    finally:
        db.session.rollback()  # read only: end the transaction (and its cursor) here
    _price(answer)
    for part in (answer["fallback"], *answer.get("variants", ())):
        if part is not None:
            _price(part)
    return answer


def _estimate_variant(campaign: Campaign, variant: dict, kept: ColumnElement[bool]) -> dict:
    """One variant's share of an estimate: its recipients (the customers it is chosen for), and for SMS their
    messages rendered from its template and counted."""
    where = and_(kept, variants.assignment(campaign.variants, campaign.id, Customer.id) == variant["name"])
    answer = {"name": variant["name"], "segments": None, "by_encoding": None, "too_long": None}
    if campaign.channel == Channel.SMS:
        answer.update(_count_sms(variant["base_template"], where, campaign.track_links))
    else:
        answer["recipients"] = recipients.count_customers(where)
    return {**answer, "cost": None, "currency": None}


def _summed(parts: list[dict]) -> dict:
    """SMS estimates' recipients, segments, split by encoding and too-long messages, added up."""
    by_encoding = {
        name: {key: sum(part["by_encoding"][name][key] for part in parts) for key in ("messages", "segments")}
        for name in (GSM_7, UCS_2)
    }
    return {
        "recipients": sum(part["recipients"] for part in parts),
        "segments": sum(part["segments"] for part in parts),
        "by_encoding": by_encoding,
        "too_long": sum(part["too_long"] for part in parts),
    }


def _price(answer: dict) -> None:
    """An estimate's `cost` and `currency`, from its SMS `segments` (null for WhatsApp, or without a price)."""
    price, currency = current_app.config["SMS_SEGMENT_PRICE"], current_app.config["CURRENCY"]
    if answer["segments"] is not None and price is not None:
        answer["cost"] = price * answer["segments"]  # exact: a Decimal times a whole number
        answer["currency"] = currency


def _fallback_estimate(campaign: Campaign, kept: ColumnElement[bool]) -> dict | None:
    """The worst case of the campaign's SMS fallback: every recipient's WhatsApp message falling back, less
    the customers opted out of sms (they get none). None without a fallback."""
    if not campaign.sms_fallback:
        return None
    sms_allowed = recipients.opt_out_filter(Channel.SMS)
    answer = _count_sms(campaign.sms_fallback["base_template"], and_(kept, sms_allowed), campaign.track_links)
    skipped = recipients.count_customers(and_(kept, ~sms_allowed))
    return {**answer, "skipped_opted_out": skipped, "cost": None, "currency": None}


def _count_sms(template: str, where: ColumnElement[bool], track_links: bool) -> dict:
    """Recipients, segments and their split by encoding, rendering each recipient's message in turn (with
    its links shortened, when the campaign tracks them: the short link's length is what is billed)."""
    limit = CHANNEL_LIMITS[Channel.SMS]
    render_row = compile_template(template, recipients.RENDER_FIELDS)
    messages = {GSM_7: 0, UCS_2: 0}
    segments = {GSM_7: 0, UCS_2: 0}
    count = too_long = 0
    for row in recipients.stream_recipient_fields(where):
        count += 1
        body = render_row(row)
        if track_links and shorten.has_link(body):
            body = shorten.sample(current_app).shorten(body)  # one per body: its links are its own
        if len(body) > limit:
            too_long += 1
            continue
        encoding, _, parts = measure(body)
        messages[encoding] += 1
        segments[encoding] += parts
    by_encoding = {name: {"messages": messages[name], "segments": segments[name]} for name in (GSM_7, UCS_2)}
    return {
        "recipients": count,
        "segments": sum(b["segments"] for b in by_encoding.values()),
        "by_encoding": by_encoding,
        "too_long": too_long,
    }


def link_stats(campaign_id: int) -> dict:
    """For each original URL of the campaign's messages: the messages that carry it, its clicks, the
    messages in which it was clicked, and the click rate over those delivered (over those sent when no
    delivery receipt has come: a provider that sends none). Reads the messages with links: asked for on
    its own, never with stats."""
    get_campaign(campaign_id)
    rows = link_counts(campaign_id)
    db.session.rollback()
    over = "delivered" if any(row["delivered"] for row in rows) else "sent"
    links = []
    for row in rows:
        reached = row[over]
        links.append(
            {
                "url": row["url"],
                "messages": row["messages"],
                "clicks": row["clicks"],
                "clicked": row["clicked"],
                "reached": reached,
                "click_rate": round(row["clicked"] / reached, 4) if reached else None,
            }
        )
    return {"campaign_id": campaign_id, "over": over, "links": links}


# Delivery controls: pause, resume, cancel and retry-failed. Each locks the campaign row first, so that
# two controls (or a control and a send) on one campaign run one after another: the second sees what the
# first did. A control repeated on a campaign already where it leads changes nothing and answers it as it
# is; a control its status does not allow is a 409 naming that status.


def _not_allowed(campaign: Campaign, action: str, allowed: tuple[str, ...]) -> ConflictError:
    names = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
    return ConflictError(
        f"campaign {campaign.id} is {campaign.status}; only {names} campaigns can {action}",
        campaign_status=campaign.status,
    )


def _answer(campaign_id: int) -> Campaign:
    """The campaign as it is now, with its stats (after the commit of a control)."""
    campaign = get_campaign(campaign_id)
    db.session.refresh(campaign)
    return with_stats(campaign)


def pause_campaign(campaign_id: int) -> Campaign:
    """Sending or scheduled -> paused. Send jobs that run from then on leave their message pending; a
    send already past its check finishes and is recorded. The scheduled trigger stays: it does nothing
    while the campaign is paused."""
    campaign = get_campaign(campaign_id, lock=True)
    try:
        if campaign.status != CampaignStatus.PAUSED and not lifecycle.pause(campaign.id):
            raise _not_allowed(campaign, "be paused", CampaignStatus.PAUSABLE)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return _answer(campaign_id)


def resume_campaign(campaign_id: int) -> Campaign:
    """Paused -> sending, its window queued again at once; or scheduled, keeping its trigger, when its
    `scheduled_at` is still ahead. The message rows are the truth: the jobs a pause found ran without
    work and put their messages back in line, and a job from before the pause that runs now claims its
    message as before (a job of an earlier turn claims nothing)."""
    campaign = get_campaign(campaign_id, lock=True)
    try:
        if campaign.status in (CampaignStatus.SENDING, CampaignStatus.SCHEDULED):
            db.session.commit()  # resumed already
            return _answer(campaign_id)
        if campaign.status != CampaignStatus.PAUSED:
            raise _not_allowed(campaign, "be resumed", (CampaignStatus.PAUSED,))
        status = lifecycle.resume(campaign.id)
        scheduled_at = campaign.scheduled_at
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    if status == CampaignStatus.SCHEDULED:
        triggers.sync_dispatch(campaign_id, scheduled_at)  # put back a trigger Redis may have lost
    else:
        triggers.sync_dispatch(campaign_id, None)
        window.refill(campaign_id)
        lifecycle.finish_campaign(campaign_id)  # everything went out before the pause
    return _answer(campaign_id)


# Seconds a cancel spends canceling its campaign's waiting messages before it answers; a job of the
# control queue (and the reconciler after it) does the rest.
CANCEL_ANSWER_BUDGET = 0.5


def cancel_campaign(campaign_id: int) -> Campaign:
    """Draft, scheduled, sending or paused -> canceled, for good, committed at once: no send claims another
    of its messages from then on. Then its waiting messages are canceled in batches that skip rows another
    transaction holds, for at most `CANCEL_ANSWER_BUDGET` seconds, the rest by a job. Sends in flight are
    not waited for: each records what its provider said (a message the provider took is `sent`)."""
    campaign = get_campaign(campaign_id, lock=True)
    try:
        if campaign.status != CampaignStatus.CANCELED:
            if not lifecycle.cancel(campaign.id):
                raise _not_allowed(campaign, "be canceled", CampaignStatus.CANCELABLE)
            had_trigger = campaign.scheduled_at is not None
        else:
            had_trigger = False
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    if had_trigger:
        triggers.sync_dispatch(campaign_id, None)
    _, done = lifecycle.cancel_all_waiting(campaign_id, CANCEL_ANSWER_BUDGET)
    if not done:
        window.enqueue_cancel(campaign_id)
    return _answer(campaign_id)


def retry_failed(campaign_id: int, include_unknown: bool = False) -> dict:
    """Send again the campaign's failed and undelivered messages whose failure is not permanent: back to
    pending with fresh retries, queued, and the campaign back to sending. Permanent failures (an invalid
    number, opted out, blacklisted, a message too long, a customer gone) stay as they are, and so do the
    failures whose outcome is unknown (the provider may have the message) unless `include_unknown`; each
    is counted."""
    campaign = get_campaign(campaign_id, lock=True)
    try:
        if campaign.status not in CampaignStatus.RETRYABLE:
            raise _not_allowed(campaign, "have their failed messages sent again", CampaignStatus.RETRYABLE)
        left = (ErrorClass.PERMANENT,) if include_unknown else (ErrorClass.PERMANENT, ErrorClass.UNKNOWN)
        retryable = func.coalesce(OutboundMessage.error_class, "").not_in(left)
        with statement_budget(db.session, current_app.config["SEND_STATEMENT_TIMEOUT"]):
            rows = lifecycle.retry_failed_messages(campaign.id, retryable)
        if rows.count:
            lifecycle.reopen_for_retry(campaign.id)
        unknown = func.coalesce(OutboundMessage.error_class, "") == ErrorClass.UNKNOWN
        unknown_left, not_retryable = db.session.execute(
            select(func.count().filter(unknown), func.count().filter(~unknown)).where(
                OutboundMessage.campaign_id == campaign.id,
                OutboundMessage.status.in_((MessageStatus.FAILED, MessageStatus.UNDELIVERED)),
            )
        ).one()
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    if rows.count:
        window.refill(campaign_id)
    return {
        "campaign": _answer(campaign_id),
        "requeued": rows.count,
        "not_retryable": not_retryable,
        "unknown_left": unknown_left,
    }
