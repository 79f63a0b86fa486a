"""Link codes: the `{code}` of a short link `{LINK_BASE_URL}/{code}`, one per message and link.

A code is the message's id and the link's position in it (`id * 16 + position`), encrypted under the
service's secret key by a 58-bit block cipher (a four-round Feistel network whose round function is
HMAC-SHA256: a pseudorandom permutation, Luby-Rackoff), written as exactly 10 base-62 characters. So:
- a code is its own for each message and link, and holds no sequence: without the key, one code says
  nothing about another, and a made-up code names a real link with odds of about (links issued) / 2^58;
- nothing is stored to issue one, and a message sent again (a retry, a send in doubt) carries the same
  codes as before, so a link in a first copy never goes dead;
- the redirect decodes it with one computation and reads the link's URL from its message's row.
Changing SECRET_KEY (or the key the service keeps) changes every code: links sent before stop working.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from flask import Flask

from app.secrets import secret_key

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LENGTH = 10
# Links a message may carry: positions 0-15 (a URL past the 16th is left as it is).
MAX_LINKS = 16
_POSITION_BITS = 4
_HALF_BITS = 29  # the cipher's block: 58 bits, under 62**10 (about 2**59.5)
_HALF_MASK = (1 << _HALF_BITS) - 1
_ROUNDS = 4
# The largest message id a code can carry (2**54 - 1): far beyond a bigint sequence's practical reach.
MAX_MESSAGE_ID = (1 << (2 * _HALF_BITS - _POSITION_BITS)) - 1
_FORM = re.compile(rf"[0-9A-Za-z]{{{LENGTH}}}")
_INDEX = {character: value for value, character in enumerate(ALPHABET)}


class Codec:
    """Encodes and decodes link codes under one key (the purpose `links` mixed into the secret key)."""

    def __init__(self, key: bytes) -> None:
        keys = [hmac.new(key, b"link-codes:%d" % r, hashlib.sha256).digest() for r in range(_ROUNDS)]
        # Keyed once; each round copies its keyed state (half the cost of keying anew: a redirect decodes one).
        self._macs = [hmac.new(round_key, digestmod=hashlib.sha256) for round_key in keys]

    def _round(self, r: int, half: int) -> int:
        mac = self._macs[r].copy()
        mac.update(half.to_bytes(4, "big"))
        return int.from_bytes(mac.digest()[:4], "big") & _HALF_MASK

    def encode(self, message_id: int, position: int) -> str:
        """The code of the link at `position` (0-15) of message `message_id`."""
        if not 0 <= position < MAX_LINKS or not 0 <= message_id <= MAX_MESSAGE_ID:
            raise ValueError(f"no code for message {message_id}, link {position}")
        value = message_id << _POSITION_BITS | position
        left, right = value >> _HALF_BITS, value & _HALF_MASK
        for r in range(_ROUNDS):
            left, right = right, left ^ self._round(r, right)
        value = left << _HALF_BITS | right
        characters = []
        for _ in range(LENGTH):
            value, digit = divmod(value, 62)
            characters.append(ALPHABET[digit])
        return "".join(reversed(characters))

    def decode(self, code: str) -> tuple[int, int] | None:
        """`(message_id, position)` named by `code`, or None when it is not a code's form. (A code of the right
        form always decodes: whether its message and link exist is the database's to say.)"""
        if not _FORM.fullmatch(code):
            return None
        value = 0
        for character in code:
            value = value * 62 + _INDEX[character]
        if value >> (2 * _HALF_BITS):
            return None  # no code is this large
        left, right = value >> _HALF_BITS, value & _HALF_MASK
        for r in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(r, left), left
        value = left << _HALF_BITS | right
        return value >> _POSITION_BITS, value & (MAX_LINKS - 1)


def codec(app: Flask) -> Codec:
    """The deployment's codec (made once per process)."""
    made = app.extensions.get("link_codec")
    if made is None:
        made = app.extensions["link_codec"] = Codec(secret_key(app))
    return made
