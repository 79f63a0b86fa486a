"""Message templates: one pure render function for the preview and the worker."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

PLACEHOLDERS = ("first_name", "last_name", "preferred_product", "location")
UNKNOWN = "[unknown]"
CHANNEL_LIMITS = {"sms": 1600, "whatsapp": 4096}
MAX_FALLBACK = 100
ATTRIBUTE_PREFIX = "attributes."

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# `{name}` or `{name|fallback}`: a built-in field or `attributes.KEY` (app.customers.attributes' key rule).
_FILLABLE = re.compile(
    rf"(?P<name>[a-z_]+|attributes\.[a-z][a-z0-9_]{{0,39}})(?:\|(?P<fallback>[^|]{{0,{MAX_FALLBACK}}}))?"
)


def _parsed(inner: str) -> tuple[str, str | None] | None:
    """(name, fallback) of a placeholder's text when rendering can fill it, else None."""
    match = _FILLABLE.fullmatch(inner)
    if match is None:
        return None
    name = match.group("name")
    if name not in PLACEHOLDERS and not name.startswith(ATTRIBUTE_PREFIX):
        return None
    return name, match.group("fallback")


def unknown_placeholders(template: str) -> list[str]:
    """The placeholders in `template` that rendering cannot fill (an unknown field, a bad attribute name, a
    fallback over 100 characters or holding `|`), in order of appearance, once each."""
    seen: dict[str, None] = {}
    for match in _PLACEHOLDER.finditer(template):
        if _parsed(match.group(1)) is None:
            seen.setdefault(match.group(0), None)
    return list(seen)


def _text(value: object) -> str:
    """A field's or attribute's value as message text: booleans as `true`/`false`, whole numbers without
    `.0`."""
    if value is None:
        return ""
    if type(value) is str:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _lookup(name: str, fields: Mapping[str, object]) -> object:
    if name.startswith(ATTRIBUTE_PREFIX):
        return (fields.get("attributes") or {}).get(name[len(ATTRIBUTE_PREFIX) :])
    return fields.get(name)


def _shown(text: str, fallback: str | None) -> str:
    if text.strip():
        return text
    return UNKNOWN if fallback is None else fallback


def _value(name: str, fallback: str | None, fields: Mapping[str, object]) -> str:
    return _shown(_text(_lookup(name, fields)), fallback)


def render(template: str, fields: Mapping[str, object]) -> str:
    """`template` with each placeholder rendering can fill replaced by its field or attribute (`fields`
    holds the customer's `attributes` as a mapping); a missing, null, empty or whitespace-only value renders
    as the placeholder's fallback, or `[unknown]` without one. Values are inserted as they are, never
    re-parsed."""

    def substitute(match: re.Match[str]) -> str:
        parsed = _parsed(match.group(1))
        return match.group(0) if parsed is None else _value(*parsed, fields)

    return _PLACEHOLDER.sub(substitute, template)


def compile_template(template: str, names: Sequence[str]) -> Callable[[Sequence[object]], str]:
    """`render` for many recipients: the template parsed once into a function of a row of values (in the
    order of `names`, `attributes` among them when it uses any), rendering exactly as `render` does; for the
    estimate's 100k bodies, where one regex substitution with a callback per placeholder would cost more
    than the rest of the count."""
    parts: list[str] = []
    getters: list[Callable[[Sequence[object]], str]] = []
    last = 0
    for match in _PLACEHOLDER.finditer(template):
        parsed = _parsed(match.group(1))
        if parsed is None:
            continue
        name, fallback = parsed
        parts.append(_escape_braces(template[last : match.start()]) + "{}")
        getters.append(_getter(name, fallback, names))
        last = match.end()
    form = "".join(parts) + _escape_braces(template[last:])

    def render_row(row: Sequence[object]) -> str:
        return form.format(*[get(row) for get in getters])

    return render_row


def _getter(name: str, fallback: str | None, names: Sequence[str]) -> Callable[[Sequence[object]], str]:
    if name.startswith(ATTRIBUTE_PREFIX):
        index, key = names.index("attributes"), name[len(ATTRIBUTE_PREFIX) :]
        return lambda row: _shown(_text((row[index] or {}).get(key)), fallback)
    index = names.index(name)
    return lambda row: _shown(_text(row[index]), fallback)


def over_limit(text: str, channel: str) -> str | None:
    """Why `text` is too long for `channel`, or None when it fits."""
    limit = CHANNEL_LIMITS[channel]
    return f"{len(text)} characters, over the {channel} limit of {limit}" if len(text) > limit else None


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def fixed_text(template: str) -> str:
    """`template` without its placeholders rendering fills: the text every message of the campaign carries
    whoever it goes to. Its encoding is a floor: a UCS-2 character here makes every message UCS-2."""
    return _PLACEHOLDER.sub(lambda m: "" if _parsed(m.group(1)) else m.group(0), template)


def render_values(template: str, values: Sequence[str]) -> str:
    """`template` with the placeholders rendering fills replaced, in order, by `values` (as many as
    `placeholder_values` gives): a WhatsApp template's body, rendered from the parameters it was sent with."""
    given = iter(values)

    def substitute(match: re.Match[str]) -> str:
        return match.group(0) if _parsed(match.group(1)) is None else next(given)

    return _PLACEHOLDER.sub(substitute, template)


def placeholder_values(template: str, fields: Mapping[str, object]) -> list[str]:
    """The value of each placeholder rendering fills in `template`, in order of appearance (once per
    appearance), rendered as `render` would: a WhatsApp template's body parameters."""
    values = []
    for match in _PLACEHOLDER.finditer(template):
        parsed = _parsed(match.group(1))
        if parsed is not None:
            values.append(_value(*parsed, fields))
    return values
