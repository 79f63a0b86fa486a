"""What text the service stores: the one rule for names, templates and imported fields."""

from __future__ import annotations

import unicodedata

# Embeddings, overrides and isolates reorder how text is displayed ("Trojan Source"); the marks
# (U+200E, U+200F) and joiners that right-to-left scripts and emoji need are allowed.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def text_problem(value: str, multiline: bool = False) -> str | None:
    """Why `value` cannot be stored, or None: no control characters (a newline only where `multiline`),
    no bidirectional overrides, and valid Unicode (no lone surrogates)."""
    for char in value:
        if char == "\n" and multiline:
            continue
        if unicodedata.category(char) == "Cc":
            allowed = "other than newline " if multiline else ""
            return f"Must not contain control characters {allowed}(found U+{ord(char):04X})."
        if char in BIDI_CONTROLS:
            return f"Must not contain bidirectional override characters (found U+{ord(char):04X})."
        if "\ud800" <= char <= "\udfff":
            return "Must be valid Unicode (no lone surrogates)."
    return None
