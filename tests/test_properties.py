"""Property tests: no input crashes the template renderer or phone parsing, and what they promise holds."""

import re
import string

import phonenumbers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.customers.phones import InvalidPhone, normalize_phone
from app.messaging.templates import PLACEHOLDERS, UNKNOWN, render, unknown_placeholders

# Templates made of text, braces and placeholders, known and unknown, so that every branch is hit.
pieces = st.one_of(
    st.text(max_size=20),
    st.sampled_from([f"{{{name}}}" for name in PLACEHOLDERS] + ["{", "}", "{}", "{{first_name}}", "{nickname}"]),
)
templates = st.lists(pieces, max_size=12).map("".join)
values = st.one_of(st.none(), st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.booleans())
field_maps = st.dictionaries(st.sampled_from(PLACEHOLDERS + ("other",)), values, max_size=5)
regions = st.sampled_from(["KE", "GB", "US", "NG", "IN", "ZZ", "", "XX"])


@given(templates, field_maps)
@settings(max_examples=400)
def test_render_never_crashes(template, fields):
    assert isinstance(render(template, fields), str)


# Values that cannot spell a placeholder (no braces, no underscore).
plain_values = st.one_of(st.none(), st.text(alphabet=string.ascii_uppercase + string.digits + " \t", max_size=20))


@given(templates, st.dictionaries(st.sampled_from(PLACEHOLDERS), plain_values))
@settings(max_examples=400)
def test_no_known_placeholder_survives_rendering(template, fields):
    rendered = render(template, fields)
    assert not any(f"{{{name}}}" in rendered for name in PLACEHOLDERS)


@given(st.text(max_size=200), field_maps)
def test_render_never_crashes_on_any_text(template, fields):
    assert isinstance(render(template, fields), str)


@given(st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=200), field_maps)
def test_text_without_braces_renders_unchanged(template, fields):
    assert render(template, fields) == template


@given(st.sampled_from(PLACEHOLDERS), st.text(max_size=50))
@example("first_name", "{last_name}")
@example("first_name", "\\1 \\g<0>")
def test_values_are_inserted_verbatim(name, value):
    rendered = render(f"<{{{name}}}>", {name: value})
    assert rendered == f"<{value if value.strip() else UNKNOWN}>"


@given(templates)
def test_unknown_placeholders_are_those_render_leaves_alone(template):
    unknown = unknown_placeholders(template)
    assert len(unknown) == len(set(unknown))
    assert all(re.fullmatch(r"\{[^{}]*\}", p) and p[1:-1] not in PLACEHOLDERS for p in unknown)
    rendered = render(template, dict.fromkeys(PLACEHOLDERS, "v"))
    assert all(p in rendered for p in unknown)


@given(st.text(max_size=60), regions)
@example("0712345678", "KE")
@example("+", "KE")
@example("\x00" * 3, "KE")
@example("+254" + "7" * 200, "KE")
@example("\ufeff+254712345678", "KE")
@settings(max_examples=400)
def test_phone_parsing_never_crashes(raw, region):
    try:
        phone = normalize_phone(raw, region)
    except InvalidPhone:
        return
    # A number it accepts is E.164 (up to 20 digits: libphonenumber validates some above 15), valid,
    # and stable when parsed again.
    assert re.fullmatch(r"\+[1-9]\d{1,19}", phone)
    assert phonenumbers.is_valid_number(phonenumbers.parse(phone, None))
    assert normalize_phone(phone, region) == phone


@given(st.from_regex(r"\+?[0-9 ()\-.]{0,25}", fullmatch=True), regions)
@settings(max_examples=400)
def test_phone_like_strings_never_crash(raw, region):
    try:
        normalize_phone(raw, region)
    except InvalidPhone:
        pass


def _full_parse(raw: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Valid numbers of every region and type, written in E.164: Italy's leading zero, national prefixes
# that look like the start of a number (e.g. Argentina's), shared country codes (+1, +7, +44).
EXAMPLE_NUMBERS = sorted(
    {
        phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        for region in phonenumbers.SUPPORTED_REGIONS
        for kind in range(12)
        if (number := phonenumbers.example_number_for_type(region, kind)) is not None
    }
)


@given(st.one_of(st.sampled_from(EXAMPLE_NUMBERS), st.from_regex(r"\+[0-9]{2,21}", fullmatch=True)), regions)
@example("+2540712345678", "KE")  # a national prefix after the country code
@example("+390612345678", "KE")  # Italy keeps its leading zero
@example("+49335199080462505", "KE")  # 17 digits, valid
@settings(max_examples=500)
def test_e164_input_reads_as_libphonenumber_reads_it(raw, region):
    try:
        phone = normalize_phone(raw, region)
    except InvalidPhone:
        phone = None
    assert phone == _full_parse(raw, region)


def test_every_region_s_example_numbers_are_kept():
    assert len(EXAMPLE_NUMBERS) > 900
    for raw in EXAMPLE_NUMBERS:
        assert normalize_phone(raw, "KE") == raw
