"""An SMS body's encoding and segments, against known vectors (the limits providers and Twilio's segment
calculator use) and against the GSM 03.38 codec itself."""

from __future__ import annotations

import random

import gsm0338  # noqa: F401 - registers the `gsm03.38` codec
import pytest

from app.messaging.segments import GSM_CHARACTERS, GSM_EXTENSION, encode_info, segments

EXTENSION = "^{}\\[~]|€\f"


@pytest.mark.parametrize(
    ("body", "encoding", "units", "parts"),
    [
        ("", "GSM-7", 0, 1),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ!\"#¤%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà\n\r", "GSM-7", 64, 1),
        ("a" * 159 + "€", "GSM-7", 161, 2),  # an extension character is two septets
        ("a" * 158 + "{", "GSM-7", 160, 1),
        # 152 septets, then `€` would straddle the first part's boundary: it starts the second part
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),
        ("a" * 151 + "€" + "a" * 153, "GSM-7", 306, 2),
        ("’" * 70, "UCS-2", 70, 1),  # a curly quote forces UCS-2
        ("’" * 71, "UCS-2", 71, 2),
        ("a" * 133 + "’", "UCS-2", 134, 2),
        ("a" * 134 + "’", "UCS-2", 135, 3),
        ("😀" * 35, "UCS-2", 70, 1),  # outside the BMP: two UTF-16 units each
        ("😀" * 36, "UCS-2", 72, 2),
        # 66 units, then a surrogate pair that would straddle the boundary: it starts the second part
        ("a" * 66 + "😀" + "a" * 66, "UCS-2", 134, 3),
        ("a" * 65 + "😀" + "a" * 67, "UCS-2", 134, 2),
        ("á", "UCS-2", 1, 1),  # not in the default alphabet (only the Spanish shift table has it)
        ("\x1b", "UCS-2", 1, 1),  # the escape introduces the extension table; it is no character to send
    ],
)
def test_known_vectors(body, encoding, units, parts):
    info = encode_info(body)
    assert (info.encoding, info.characters, info.units, info.segments) == (encoding, len(body), units, parts)
    assert segments(body) == parts


def test_extension_characters_are_exactly_the_ten_of_the_extension_table():
    assert GSM_EXTENSION == frozenset(EXTENSION)
    for c in EXTENSION:
        assert encode_info(c).units == 2
        assert len(c.encode("gsm03.38")) == 2  # escape + character


def test_septets_match_the_gsm_codec_on_random_gsm_bodies():
    rng = random.Random(7)
    alphabet = sorted(GSM_CHARACTERS)
    for _ in range(500):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        assert encode_info(body).units == len(body.encode("gsm03.38"))
        assert encode_info(body).encoding == "GSM-7"


def test_non_gsm_characters_are_named_once_each_in_order_of_appearance():
    info = encode_info("Karibu 😀 “Amina” — 😀 ’")
    assert info.encoding == "UCS-2"
    assert info.non_gsm_characters == ("😀", "“", "”", "—", "’")
    assert encode_info("Hi {Amina} €5").non_gsm_characters == ()
    assert encode_info("Hi").as_dict() == {
        "encoding": "GSM-7",
        "characters": 2,
        "units": 2,
        "segments": 1,
        "non_gsm_characters": [],
    }
