"""Quiet hours: the daily window (`QUIET_HOURS`, in the recipient's local time) in which a campaign that
respects them sends nothing.

The recipient's time zone comes from their phone number (libphonenumber's time-zone data): a number that
maps to exactly one zone is in it (or to several that keep the same time); one that maps to none, or to
zones hours apart (a US toll-free number, a Russian mobile), gets `DEFAULT_TIMEZONE`, as the service
cannot tell where its owner is. The send job asks
`window_end` right before the provider call; inside the window the message waits for its end
(`app.messaging.jobs`).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import phonenumbers
from phonenumbers import timezone as phone_timezones

from config import TimeWindow

# What libphonenumber answers for a number it cannot place.
_UNKNOWN_ZONE = "Etc/Unknown"


@functools.lru_cache(maxsize=4096)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zone_names_for(phone: str) -> tuple[str, ...]:
    """The IANA time zones libphonenumber places `phone` (E.164) in: none, one, or several."""
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return ()
    return tuple(z for z in phone_timezones.time_zones_for_number(number) if z != _UNKNOWN_ZONE)


def recipient_zone(phone: str, now: datetime, default: str) -> ZoneInfo:
    """The time zone quiet hours are read in for `phone` at `now`: its one zone; of several, the first
    when they all keep the same time at `now` (a British mobile: London, Jersey, Guernsey, Isle of Man);
    else `default` (no zone, or zones hours apart: a US toll-free number)."""
    zones = [_zone(name) for name in zone_names_for(phone)]
    if len(zones) == 1 or (zones and len({now.astimezone(z).utcoffset() for z in zones}) == 1):
        return zones[0]
    return _zone(default)


def window_end(now: datetime, zone: ZoneInfo, window: TimeWindow) -> datetime | None:
    """When `window` ends (UTC) if `now` is inside it in `zone`, else None.

    The start is inside, the end is not. A window that crosses midnight (`20:00-08:00`) ends the next
    morning when entered in the evening, this morning when entered after midnight. Around a change of the
    clocks the end is the wall-clock time as `zoneinfo` resolves it, never earlier than a second from now."""
    local = now.astimezone(zone)
    at = local.time().replace(tzinfo=None)
    if window.start < window.end:
        inside = window.start <= at < window.end
    else:
        inside = at >= window.start or at < window.end
    if not inside:
        return None
    day = local.date() if at < window.end else local.date() + timedelta(days=1)
    end = datetime.combine(day, window.end, tzinfo=zone).astimezone(UTC)
    return max(end, now.astimezone(UTC) + timedelta(seconds=1))


def quiet_until(phone: str | None, now: datetime, window: TimeWindow | None, default_zone: str) -> datetime | None:
    """When a message to `phone` may go, if `now` is inside the quiet hours where its recipient is; else
    None (no window set, outside it, or no number to place)."""
    if window is None or phone is None:
        return None
    return window_end(now, recipient_zone(phone, now, default_zone), window)
