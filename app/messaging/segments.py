"""How an SMS body is encoded and how many segments (billed parts) it takes: pure, for 100k bodies at a time.

A body is sent in GSM-7 when every character is in the GSM 03.38 default alphabet or its extension
table (3GPP TS 23.038, taken from the `gsm0338` codec's tables): each character is one septet, an
extension character (`^ { } \\ [ ~ ] | €` and form feed) two, an escape and the character. One SMS
holds 160 septets; a longer body is split into parts of 153 (7 go to the concatenation header). Any
other character forces UCS-2 for the whole body: UTF-16 code units, 70 in one SMS, 67 per part, a
character outside the Basic Multilingual Plane (most emoji) taking two units.

Only the codec's tables are used, as sets: its encoder builds the bytes a character at a time, far
slower than a set comparison and a count, and an estimate needs no bytes.

A part never ends between an escape and its character, nor between the two halves of a surrogate
pair (a part must decode on its own): a pair that would straddle the boundary starts the next part,
which leaves the one before a unit short. This is the count we chose where `ceil(units / 153)` would
be one short. So 152 plain characters, a `€` and 152 more
(306 septets) take three parts, not `ceil(306 / 153) = 2`: the `€` does not fit in the first part's
last septet and moves to the second, pushing its last character into a third.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from gsm0338.charset import BASIC_CHARACTER_SET, BASIC_CHARACTER_SET_EXTENSION

GSM_7 = "GSM-7"
UCS_2 = "UCS-2"

# Septets or code units in one SMS, and per part of a longer one.
SINGLE = {GSM_7: 160, UCS_2: 70}
PART = {GSM_7: 153, UCS_2: 67}


def _characters(table: dict[int, str]) -> frozenset[str]:
    # The codec's tables name each character (`unicodedata.lookup` spells form feed "FORM FEED" too);
    # the escape itself (0x1B) introduces the extension table and is no character of a message.
    return frozenset(unicodedata.lookup(name) for name in table.values() if name != "ESCAPE")


GSM_EXTENSION: frozenset[str] = _characters(BASIC_CHARACTER_SET_EXTENSION)
GSM_CHARACTERS: frozenset[str] = _characters(BASIC_CHARACTER_SET) | GSM_EXTENSION
_EXTENSION_RE = re.compile("[" + re.escape("".join(sorted(GSM_EXTENSION))) + "]")
SINGLE_GSM, PART_GSM, SINGLE_UCS, PART_UCS = SINGLE[GSM_7], PART[GSM_7], SINGLE[UCS_2], PART[UCS_2]


@dataclass(frozen=True)
class Encoded:
    """An SMS body's encoding, its length in characters (code points) and in `units` (septets for GSM-7,
    UTF-16 code units for UCS-2), its segments, and the characters that forced UCS-2 (distinct, in order
    of appearance; empty for GSM-7)."""

    encoding: str
    characters: int
    units: int
    segments: int
    non_gsm_characters: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "encoding": self.encoding,
            "characters": self.characters,
            "units": self.units,
            "segments": self.segments,
            "non_gsm_characters": list(self.non_gsm_characters),
        }


def measure(body: str) -> tuple[str, int, int]:
    """`body`'s encoding, units and segments: the estimate's inner loop, so no object is built. An empty
    body is one GSM-7 segment: a provider bills an empty SMS as one."""
    if GSM_CHARACTERS.issuperset(body):
        # Most bodies have no extension character: one scan in C says so.
        escaped = len(_EXTENSION_RE.findall(body)) if _EXTENSION_RE.search(body) else 0
        units = len(body) + escaped
        if units <= SINGLE_GSM:
            return GSM_7, units, 1
        if not escaped:
            return GSM_7, units, -(-units // PART_GSM)
        return GSM_7, units, _walk(body, GSM_EXTENSION, PART_GSM)
    units = len(body.encode("utf-16-le")) // 2
    if units <= SINGLE_UCS:
        return UCS_2, units, 1
    if units == len(body):  # no surrogate pair: nothing to keep together
        return UCS_2, units, -(-units // PART_UCS)
    return UCS_2, units, _walk(body, None, PART_UCS)


def encode_info(body: str) -> Encoded:
    """`body`'s encoding, length, segments and the characters that forced UCS-2 (see the module's doc)."""
    encoding, units, parts = measure(body)
    non_gsm = tuple(dict.fromkeys(c for c in body if c not in GSM_CHARACTERS)) if encoding == UCS_2 else ()
    return Encoded(encoding, len(body), units, parts, non_gsm)


def segments(body: str) -> int:
    """`body`'s SMS segments: the one number the send job stores."""
    return encode_info(body).segments


def _walk(body: str, double: frozenset[str] | None, part: int) -> int:
    """Parts of `part` units each, filled in order, a two-unit character (an extension character when
    `double` is given, else one outside the BMP) never split across two parts."""
    parts, used = 1, 0
    for c in body:
        width = 2 if (c in double if double is not None else c > "\uffff") else 1
        if used + width > part:
            parts, used = parts + 1, 0
        used += width
    return parts
