"""The frequency cap (FREQUENCY_CAP): at most so many messages sent to one customer in any period, all
campaigns and channels together. A send leaves capped customers out in the statement that creates its
messages; the estimate and the audience count report them."""

from __future__ import annotations

from datetime import datetime

from flask import current_app
from sqlalchemy import ColumnElement, func, select

from app import clock
from app.models import Campaign, Customer, OutboundMessage
from config import FrequencyCap


def cap_for(campaign: Campaign | None = None) -> FrequencyCap | None:
    """The cap a send of `campaign` keeps to: FREQUENCY_CAP, unless the campaign ignores it (or none is set)."""
    if campaign is not None and campaign.ignore_frequency_cap:
        return None
    return current_app.config.get("FREQUENCY_CAP")


def capped(cap: FrequencyCap, now: datetime | None = None, besides_campaign: int | None = None) -> ColumnElement[bool]:
    """Customers with `cap.messages` or more messages a provider took within `cap.period` before `now` (those of
    `besides_campaign` left out: an SMS fallback is not held back by the WhatsApp message it replaces). The
    count reads one range of `ix_outbound_messages_customer_sent_at` per customer, and stops at the cap."""
    since = (now or clock.now()) - cap.period
    conditions = [OutboundMessage.customer_id == Customer.id, OutboundMessage.sent_at >= since]
    if besides_campaign is not None:
        conditions.append(OutboundMessage.campaign_id != besides_campaign)
    recent = select(OutboundMessage.id).where(*conditions).limit(cap.messages).correlate(Customer).subquery()
    return select(func.count()).select_from(recent).scalar_subquery() >= cap.messages


def not_capped(cap: FrequencyCap | None, now: datetime | None = None) -> ColumnElement[bool] | None:
    """The customers the cap lets a send message; None when there is no cap."""
    return None if cap is None else ~capped(cap, now)
