"""Throughput limits per provider account (`SMS_RATE_LIMIT`, `WHATSAPP_RATE_LIMIT`), shared by every worker.

A provider counts requests as they arrive, in windows of its own: at most N in any second, whatever
the number of senders. So the limit is kept where every worker of every machine sees it, in Redis, as
paced slots (GCRA): one key per provider account holds the time of the next free slot, and each send
takes the next slot, `(period + JITTER) / amount` after the one before. Slots are thus never closer than
that spacing, and no window of the limit's period ever holds more than `amount` of them.

Taking a slot is one Lua script (one round trip, atomic), timed by Redis's own clock (`TIME`), so the
workers' clocks do not matter. A send whose slot is at most `MAX_WAIT` away reserves it and sleeps until
it; a send whose slot is further away reserves nothing (a handed-back job would not come back on time,
and its slot would be lost throughput) and is handed back: the job is run again later, its message
untouched. Hand-backs happen only when more workers run than there are slots within `MAX_WAIT` (about
100 under `100/second`); to keep the extra workers from taking and handing back job after job, each
hand-back gets a turn of its own (a ticket, spaced like the slots, after the last one reserved) and runs
again at that time, so that handed-back jobs come back at the rate the limit can take them.

A send held up after its slot (a busy CPU, a slow reply from Redis) would arrive among the next window's
requests: a request that would leave more than `LATE` after its slot is not made, and the send takes a new
slot (at most `LATE_TRIES` times, then it is handed back). `JITTER` keeps the requests' arrivals at the
provider within the limit although each arrives later than its slot by a varying delay (the reply from
Redis, the sleep's overshoot, a busy CPU, the request's way to the provider): `amount` slots span
`period + JITTER`, so arrivals may drift apart by up to `JITTER` and still no window of `period` holds more
than `amount`. 30 ms costs 3 % of a per-second limit (97/s of 100/s at most) and 0.05 % of a per-minute
one.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

from flask import Flask
from limits import parse_many
from redis.exceptions import RedisError

from app.messaging.providers import provider_name
from app.messaging.providers.http import send_by
from app.models import Channel

log = logging.getLogger(__name__)

# Seconds added to the limit's period when slots are spaced: room for the jitter between a slot and the
# request's arrival at the provider (see the module's doc).
JITTER = 0.03
# The longest a send waits for its slot, in seconds; a later slot hands the job back instead.
MAX_WAIT = 1.0
# The most a request may leave after its slot, in seconds: a later one is not made, and takes a new slot
# (`app.messaging.providers.http.post`). Part of JITTER; the rest is for the request's way to the provider.
LATE = 0.015
# Slots a send takes, late for each, before its job is handed back.
LATE_TRIES = 3
# Seconds after which a job is tried again when Redis failed while it took its slot.
REDIS_FAILURE_DELAY = 5
KEY_PREFIX = "campaign_dispatch:throttle"

# KEYS[1]: the account's key. ARGV: spacing and longest wait, in microseconds.
# Returns {granted (1 or 0), microseconds to wait, the slot's time (granted) or the ticket's (refused)}.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local spacing = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'slot', 'ticket')
local slot = math.max(tonumber(state[1]) or 0, now)
local ticket = math.max(tonumber(state[2]) or 0, slot)
local granted = 0
local at
if slot - now <= max_wait then
  granted = 1
  at = slot
  redis.call('HSET', KEYS[1], 'slot', slot + spacing)
else
  at = ticket
  redis.call('HSET', KEYS[1], 'ticket', ticket + spacing)
end
local horizon = math.max(slot, ticket) + spacing
redis.call('PEXPIRE', KEYS[1], math.floor((horizon - now) / 1000) + 1000)
return {granted, at - now, at}
"""


@dataclass(frozen=True)
class Slot:
    """What the limiter answered: a slot reserved `wait` seconds from now, or (not `granted`) none within
    `MAX_WAIT`, and the job's turn `wait` seconds from now. `at` is that time on Redis's clock (seconds)."""

    granted: bool
    wait: float
    at: float


def rate_limit(app: Flask, channel: str) -> str | None:
    """The channel's limit (`SMS_RATE_LIMIT` or `WHATSAPP_RATE_LIMIT`), None when unlimited."""
    return app.config["WHATSAPP_RATE_LIMIT"] if channel == Channel.WHATSAPP else app.config["SMS_RATE_LIMIT"]


@functools.lru_cache(maxsize=32)
def spacing(limit: str) -> float:
    """Seconds between two slots under `limit` (`100/second`; several, `10/second;500/minute`, are kept
    together by pacing at the strictest), `JITTER` included."""
    return max((item.get_expiry() + JITTER) / item.amount for item in parse_many(limit))


def account_key(app: Flask, channel: str) -> str:
    """The Redis key of the channel's provider account: the provider and a stable, non-secret identity
    of the account a provider counts requests for (never a token or key)."""
    config = app.config
    name = provider_name(app, channel)
    if name == "twilio":
        sender = config["TWILIO_MESSAGING_SERVICE_SID"] or config["TWILIO_FROM"]
        identity = f"{config['TWILIO_ACCOUNT_SID']}:{sender}"
    elif name == "africastalking":
        identity = config["AFRICASTALKING_USERNAME"]
    elif name == "whatsapp_cloud":
        identity = config["WHATSAPP_PHONE_NUMBER_ID"]
    else:
        identity = channel  # the mock: one per channel
    return f"{KEY_PREFIX}:{name}:{identity}"


def take_slot(app: Flask, channel: str) -> Slot | None:
    """Reserve the channel's next slot if it is at most `MAX_WAIT` away (one round trip to Redis); None,
    without calling Redis, when the channel is unlimited. Raises Redis's errors."""
    limit = rate_limit(app, channel)
    if not limit:
        return None
    args = [round(spacing(limit) * 1e6), round(MAX_WAIT * 1e6)]
    # EVALSHA; redis-py loads the script first if the server does not know it (restarted, flushed).
    script = app.extensions["redis"].register_script(_TAKE_SLOT)
    granted, wait, at = script(keys=[account_key(app, channel)], args=args)
    return Slot(bool(granted), wait / 1e6, at / 1e6)


def wait_for_slot(app: Flask, channel: str) -> float | None:
    """What a send does before its provider call: None when it may send now (no limit, or its slot was
    reserved and has come: it slept until then, at most `MAX_WAIT`), else the seconds after which the job
    should run again, the message untouched.

    When Redis fails here the send is not made (a limit that cannot be checked could be exceeded): the
    job is to run again after `REDIS_FAILURE_DELAY` seconds, like any hand-back, using none of its retries.
    """
    asked = time.monotonic()
    try:
        slot = take_slot(app, channel)
    except RedisError as exc:
        log.warning(
            "the rate limiter is unavailable; trying the message again later",
            extra={"error": f"{type(exc).__name__}: {exc}", "delay": REDIS_FAILURE_DELAY},
        )
        return float(REDIS_FAILURE_DELAY)
    if slot is None:
        return None
    if not slot.granted:
        return slot.wait
    if slot.wait > 0:
        time.sleep(slot.wait)
    # Measured from before the round trip to Redis: a reply read late counts as lateness too.
    send_by.set(asked + slot.wait + LATE)
    return None
