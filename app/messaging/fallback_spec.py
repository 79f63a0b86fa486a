"""A campaign's `sms_fallback` as data: what triggers it and how long a WhatsApp message has to be delivered
(app.messaging.fallback acts on it; the lifecycle reads it to know when a campaign may end). The WhatsApp codes
that trigger it are WhatsApp's (`providers.whatsapp_cloud.FALLBACK_TRIGGERS`)."""

from __future__ import annotations

import re
from datetime import timedelta

UNDELIVERABLE = "undeliverable"
WINDOW_CLOSED = "window_closed"
NOT_DELIVERED = "not_delivered"
TRIGGERS = (UNDELIVERABLE, WINDOW_CLOSED, NOT_DELIVERED)
# What a fallback waits for when `not_delivered_within` is not given.
DEFAULT_WITHIN = "2h"
# The longest `not_delivered_within`: WhatsApp keeps trying a message for up to 30 days, but a fallback days
# late is not one.
MAX_WITHIN = timedelta(days=7)

_DURATION = re.compile(r"^\s*(\d{1,7})\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class FallbackError(ValueError):
    """A bad `sms_fallback`: `field` names the part that is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"sms_fallback.{field}: {message}")
        self.field = field
        self.message = message


def parse_duration(value: object) -> timedelta:
    """`30s`, `15m`, `2h` or `1d` as a duration; FallbackError for anything else, zero, or over `MAX_WITHIN`."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise FallbackError("not_delivered_within", "must be a duration like 30s, 15m, 2h or 1d")
    duration = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if not timedelta(0) < duration <= MAX_WITHIN:
        raise FallbackError("not_delivered_within", "must be more than 0 and at most 7d")
    return duration


def normalized(spec: dict) -> dict:
    """The stored form of a valid `sms_fallback` (its `on` without repeats, in the order given; the default
    `not_delivered_within`); raises FallbackError. The template's own rules are checked by the caller."""
    on = list(dict.fromkeys(spec["on"]))
    unknown = [name for name in on if name not in TRIGGERS]
    if unknown or not on:
        raise FallbackError("on", f"must list one or more of {', '.join(TRIGGERS)}")
    within = spec.get("not_delivered_within") or DEFAULT_WITHIN
    parse_duration(within)
    return {"base_template": spec["base_template"], "on": on, "not_delivered_within": within}


def within(spec: dict) -> timedelta:
    """How long a WhatsApp message has to be delivered before `not_delivered` triggers its fallback; also how
    long its campaign waits for a late failure to trigger one."""
    return parse_duration(spec.get("not_delivered_within") or DEFAULT_WITHIN)


def triggers_on(spec: dict | None, trigger: str) -> bool:
    return bool(spec) and trigger in spec.get("on", ())
