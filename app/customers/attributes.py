"""Customer attributes: the business's own data about a customer, a flat JSON object of strings, numbers and
booleans under lower-case keys. What a valid set is, and how a change merges into a stored one."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from app.text import text_problem

KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_KEYS = 50
MAX_BYTES = 8 * 1024  # the whole object, as compact JSON
MAX_VALUE_LENGTH = 500


def value_problem(value: object) -> str | None:
    """Why `value` cannot be an attribute's value, or None when it can (null is not a value: it removes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, str):
        if len(value) > MAX_VALUE_LENGTH:
            return f"longer than {MAX_VALUE_LENGTH} characters"
        return text_problem(value)
    return "must be a string, a number or a boolean"


def key_problem(key: object) -> str | None:
    if not isinstance(key, str) or not KEY.match(key):
        return "not an attribute name: a lower-case letter, then up to 39 lower-case letters, digits or _"
    return None


def change_errors(change: Mapping) -> dict[str, list[str]]:
    """`{"attributes.KEY": [reason]}` for each bad key or value of `change` (null values are removals)."""
    errors: dict[str, list[str]] = {}
    for key, value in change.items():
        problem = key_problem(key)
        if problem is None and value is not None:
            problem = value_problem(value)
        if problem:
            errors[f"attributes.{key}"] = [problem]
    return errors


def size_problem(attributes: Mapping) -> str | None:
    """Why a whole set of attributes is too big, or None."""
    if len(attributes) > MAX_KEYS:
        return f"{len(attributes)} attributes, over the limit of {MAX_KEYS}"
    size = len(json.dumps(attributes, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_BYTES:
        return f"{size} bytes as JSON, over the limit of {MAX_BYTES}"
    return None


def merged(stored: Mapping | None, change: Mapping) -> dict:
    """`stored` with `change` applied: keys it names are set, a key set to null is removed, others kept."""
    out = dict(stored or {})
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out
