"""Phone numbers are stored in E.164: any number libphonenumber validates, even above 15 digits."""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata, PhoneNumber

# What a written number may contain. Anything else (`x12`, `ext. 12`, `;ext=12`, `#`, letters) would be
# dropped by libphonenumber without a word, so it is refused instead.
_NUMBER_TEXT = re.compile(r"[\d\s+().\-/]*")
# A number already in E.164 form, with a national number of 2 to 17 digits (libphonenumber's bounds).
_E164_TEXT = re.compile(r"\+([1-9][0-9]{2,19})")


class InvalidPhone(ValueError):
    pass


def normalize_phone(raw: str, default_region: str) -> str:
    """`raw` in E.164 (`0712345678` with region KE -> `+254712345678`); `InvalidPhone` if it is not a
    valid number, or carries an extension or anything but digits, spaces and `+ ( ) - . /`."""
    fast = _valid_e164(raw)
    if fast is not None:
        return fast
    if not _NUMBER_TEXT.fullmatch(raw):
        raise InvalidPhone("only digits, spaces and + ( ) - . / may appear; extensions are not accepted")
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhone(f"not a phone number: {exc}") from None
    if number.extension is not None:
        raise InvalidPhone("extensions are not accepted")
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhone("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _valid_e164(raw: str) -> str | None:
    """`raw` itself when it is a valid number already written in E.164 and `phonenumbers.parse` would
    read it unchanged; None when that takes the full parse (which then decides).

    The full parse costs three quarters of an import's time per row; for `+` and digits it comes down
    to what is done here: split off the country code (country codes are prefix-free), and strip a
    national prefix when the number starts with one. Numbers that start with a national prefix, or
    with 0 (Italy keeps it), go to the full parse."""
    match = _E164_TEXT.fullmatch(raw)
    if match is None:
        return None
    digits = match.group(1)
    for size in (1, 2, 3):
        country_code = int(digits[:size])
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None or not 2 <= len(national) <= 17 or national[0] == "0":
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and re.match(prefix, national):
        return None
    if not phonenumbers.is_valid_number(PhoneNumber(country_code=country_code, national_number=int(national))):
        return None
    return raw


def country_of(e164: str) -> str | None:
    """The ISO 3166 alpha-2 region of a number already in E.164 (`+254712345678` -> `KE`); None when no one
    region owns it (a non-geographic number)."""
    digits = e164.removeprefix("+")
    for size in (1, 2, 3):
        country_code = int(digits[:size] or 0)
        if country_code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    # Italy keeps the leading 0 of its numbers: libphonenumber marks it rather than keeping it in the digits.
    leading = len(national) - len(national.lstrip("0"))
    number = PhoneNumber(
        country_code=country_code,
        national_number=int(national or 0),
        italian_leading_zero=leading > 0 or None,
        number_of_leading_zeros=leading if leading > 1 else None,
    )
    region = phonenumbers.region_code_for_number(number)
    return region if region and region != "001" else None
