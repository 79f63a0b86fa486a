"""What waits in Redis while PostgreSQL cannot be reached, to be applied when it returns.

PostgreSQL is the truth, but two things cannot wait for it: a provider's receipt or a customer's `STOP`
(Twilio and Africa's Talking post a callback once: one answered 503 is lost), and the outcome of a send the
provider has taken (unrecorded, its message would be sent again). While PostgreSQL is unavailable and Redis
is not, each is appended to a list in Redis and answered or ended as if applied:

- `campaign_dispatch:spool:outcomes`: a send's record (its `lifecycle.RECORD` parameters, which name its
  claim);
- `campaign_dispatch:spool:inbound`: receipts and customers' keywords, in the order they came.

Every worker process drains both lists every `DRAIN_INTERVAL` seconds (`Drainer`, applying each item with
`app.messaging.deferred.apply`), and the reconciler before it releases any claim: the outcomes first (a
receipt may name the provider id one of them records), each item applied, then taken off the head of its
list. One process drains at a time (a lock in Redis), so the
items are applied in order. A process that dies between applying an item and taking it off leaves it to
be applied again, which changes nothing: records name their claim, receipts never step back, opt-outs and
opt-ins are idempotent. So each is applied once in effect.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime

from flask import Flask
from redis import Redis
from redis.exceptions import RedisError

from app.database import describe, is_unavailable
from app.extensions import db
from app.periodic import Periodic

log = logging.getLogger(__name__)

OUTCOMES_KEY = "campaign_dispatch:spool:outcomes"
INBOUND_KEY = "campaign_dispatch:spool:inbound"
LOCK_KEY = "campaign_dispatch:spool:lock"
# Seconds between two looks at the lists in each worker process.
DRAIN_INTERVAL = 1.0
# Seconds the drainer's lock lives; renewed as it goes.
LOCK_TTL = 30

# Takes the list's head off only if it is still the item just applied (KEYS[1]: the list; ARGV[1]: the item).
_POP_IF_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  return redis.call('LPOP', KEYS[1])
end
return false
"""
# Renews or releases the lock only for its holder (KEYS[1]: the lock; ARGV[1]: its token; ARGV[2]: ms, 0: release).
_HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _encode(value):
    if isinstance(value, datetime):
        return {"__datetime__": value.isoformat()}
    raise TypeError(f"{type(value).__name__} is not kept in the spool")


def _decode(item: dict) -> dict:
    if "__datetime__" in item:
        return datetime.fromisoformat(item["__datetime__"])
    return item


def keep(redis: Redis, key: str, item: dict) -> None:
    """Append `item` to the list `key`; raises Redis's errors (the caller then fails as it would have)."""
    redis.rpush(key, json.dumps(item, default=_encode))


def keep_outcome(redis: Redis, params: dict, extra: dict | None = None) -> None:
    """Keep a send's record (`lifecycle.RECORD`'s parameters, and `extra`: what the send does after it) until
    PostgreSQL takes it."""
    keep(redis, OUTCOMES_KEY, {"record": params, "after": extra or {}})


def keep_receipts(redis: Redis, receipts: list) -> None:
    """Keep delivery receipts (`receipts.Receipt`) until PostgreSQL takes them, in their order, as one item."""
    keep(redis, INBOUND_KEY, {"receipts": [asdict(receipt) for receipt in receipts]})


def keep_keyword(redis: Redis, phone: str | None, channel: str, action: str, source: str) -> None:
    """Keep a customer's opt-out or opt-in (`optouts.apply_by_phone`'s arguments) until PostgreSQL takes it."""
    keep(redis, INBOUND_KEY, {"keyword": {"phone": phone, "channel": channel, "action": action, "source": source}})


def lengths(redis: Redis) -> dict[str, int]:
    """How many items wait in each list (one round trip)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.llen(OUTCOMES_KEY)
        pipe.llen(INBOUND_KEY)
        outcomes, inbound = pipe.execute()
    return {"outcomes": outcomes, "inbound": inbound}


def drain(redis: Redis, apply: Callable[[dict], None]) -> int:
    """Apply what waits with `apply(item)`, outcomes first, in order; returns how many items were applied.
    Stops at the first item the database cannot take now (unavailable: it stays at the head for the next
    drain). Does nothing while another process drains. Call inside an app context."""
    if not any(lengths(redis).values()):
        return 0  # the common case: one round trip
    token = secrets.token_hex(8)
    if not redis.set(LOCK_KEY, token, nx=True, px=LOCK_TTL * 1000):
        return 0
    hold = redis.register_script(_HOLD)
    pop = redis.register_script(_POP_IF_HEAD)
    applied = 0
    try:
        for key in (OUTCOMES_KEY, INBOUND_KEY):
            while True:
                raw = redis.lindex(key, 0)
                if raw is None:
                    break
                try:
                    apply(json.loads(raw, object_hook=_decode))
                except Exception as exc:
                    db.session.rollback()
                    if is_unavailable(exc):
                        return applied
                    # An item the database refuses for good would block the list: logged, and dropped.
                    log.error("dropping a spooled item the database refuses", extra={"error": describe(exc)})
                pop(keys=[key], args=[raw])
                applied += 1
                hold(keys=[LOCK_KEY], args=[token, LOCK_TTL * 1000])
    finally:
        hold(keys=[LOCK_KEY], args=[token, 0])
    if applied:
        log.info("applied what waited in Redis for the database", extra={"items": applied})
    return applied


class Drainer(Periodic):
    """`drain` every `DRAIN_INTERVAL` seconds in a daemon thread of a worker process, until stopped; one look
    at the lists' lengths (one round trip to Redis) when nothing waits. A failure (Redis down) is logged once
    and tried again next time."""

    def __init__(self, app: Flask, redis: Redis, apply: Callable[[dict], None], interval: float = DRAIN_INTERVAL):
        super().__init__(interval, "spool-drain")
        self.app = app
        self.redis = redis
        self.apply = apply
        self._failing = False

    def tick(self) -> None:
        try:
            if any(lengths(self.redis).values()):
                with self.app.app_context():
                    try:
                        drain(self.redis, self.apply)
                    finally:
                        db.session.remove()
            self._failing = False
        except RedisError as exc:
            if not self._failing:
                log.warning("spool: Redis failed (%s: %s); trying again", type(exc).__name__, exc)
            self._failing = True
        except Exception:  # noqa: BLE001 - the next look may work; the items stay in Redis
            log.exception("spool: the drain failed; trying again")
