"""Quiet hours: the daily window (`QUIET_HOURS`, in the recipient's local time) in which a campaign that
respects them sends nothing.

The recipient's time zones come from their phone number (libphonenumber's time-zone data): a number may
map to one zone (a Kenyan number), or to several when the country spans them (a Spanish mobile may be in
Madrid or the Canaries, an Australian one from the Cocos Islands to Lord Howe). A message goes only when
the window is over in every zone its number could be in; `DEFAULT_TIMEZONE` serves only numbers that map
to no zone at all. When the zones are so far apart that no moment of the day is outside the window in all
of them (a window of 16 hours over zones 9 hours apart), the message goes at the earliest moment at which
it is outside the window in the most of them, each zone counted once. The send job asks `quiet_until` right
before the provider call; inside the window the message waits for that moment (`app.messaging.jobs`).
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
# How far ahead the moment a message may go is looked for: a day, and the hour a change of clocks adds.
_HORIZON = timedelta(hours=25)


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


def recipient_zones(phone: str, default: str) -> tuple[ZoneInfo, ...]:
    """The time zones the recipient of `phone` could be in: every zone its number maps to, or `default`
    alone when it maps to none (a number libphonenumber cannot place)."""
    return tuple(_zone(name) for name in zone_names_for(phone)) or (_zone(default),)


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


def _changes(now: datetime, zone: ZoneInfo, window: TimeWindow) -> list[tuple[datetime, int]]:
    """The moments in `_HORIZON` after `now` at which `window` starts in `zone` (-1: one zone fewer outside
    it) or ends (+1), in UTC."""
    today = now.astimezone(zone).date()
    changes = []
    for days in range(-1, 3):
        day = today + timedelta(days=days)
        for at, change in ((window.start, -1), (window.end, +1)):
            moment = datetime.combine(day, at, tzinfo=zone).astimezone(UTC)
            if now < moment <= now + _HORIZON:
                changes.append((moment, change))
    return changes


def clear_of(zones: tuple[ZoneInfo, ...], now: datetime, window: TimeWindow) -> datetime | None:
    """The earliest moment after `now` (UTC) at which `window` is over in every one of `zones`; when no
    moment of the day is, the earliest at which it is over in the most of them. None when `now` is as good
    as it gets (outside the window everywhere, most often).

    Each zone's window starts and ends once a day, so the count of zones outside it changes only at those
    moments: the day ahead is swept once, in order."""
    outside = sum(window_end(now, zone, window) is None for zone in zones)
    if outside == len(zones):
        return None
    best, best_at = outside, None
    changes = sorted(change for zone in zones for change in _changes(now, zone, window))
    for index, (moment, change) in enumerate(changes):
        outside += change
        if index + 1 < len(changes) and changes[index + 1][0] == moment:
            continue  # every change at one moment first
        if outside > best:
            best, best_at = outside, moment
            if best == len(zones):
                break
    return None if best_at is None else max(best_at, now.astimezone(UTC) + timedelta(seconds=1))


def quiet_until(phone: str | None, now: datetime, window: TimeWindow | None, default_zone: str) -> datetime | None:
    """When a message to `phone` may go, if `now` is inside the quiet hours where its recipient could be
    (`clear_of` their zones); else None (no window set, outside it everywhere, or no number to place)."""
    if window is None or phone is None:
        return None
    return clear_of(recipient_zones(phone, default_zone), now, window)
