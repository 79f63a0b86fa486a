"""A/B variants: a campaign's 2 to 5 wordings, one per recipient.

A campaign's `variants` is a list of `{"name", "base_template", "whatsapp_template", "weight"}`. Each
recipient gets one variant, chosen from the campaign and the customer alone: a hash of the two picks a
point in the sum of the weights, and the variant whose share holds it is theirs. The same customer always
gets the same variant in a campaign, whenever and however often they are added; the choice is stored on
the message (`variant`) when it is created, so a retry or a resume never switches it. The hash is plain
integer arithmetic, computed the same way in SQL (`assignment`, in the statement that creates the messages)
and in Python (`choose`, for the estimate and the preview).

The send job renders a message from its variant's template (`for_message`). The stats count every status
per variant (`app.messaging.stats`).
"""

from __future__ import annotations

import re

from sqlalchemy import BigInteger, ColumnElement, case, literal, literal_column

MIN_VARIANTS = 2
MAX_VARIANTS = 5
MAX_WEIGHT = 1000
NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
# Knuth's multiplicative hash of the customer id, turned by an offset the campaign's id scatters over the
# whole range (so that each campaign splits its customers its own way): its value in [0, 2**32) scaled to the
# sum of the weights by its high bits (the low bits of a product follow the id's too closely).
_MULTIPLIER = 2654435761
_CAMPAIGN_MULTIPLIER = 2246822519
_SPACE = 2**32


def _offset(campaign_id: int) -> int:
    return campaign_id * _CAMPAIGN_MULTIPLIER % _SPACE


class VariantError(ValueError):
    """A bad `variants`: `field` names the part that is wrong (`variants`, `variants.1.name`, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def normalized(variants: list[dict], channel: str) -> list[dict]:
    """The stored form of valid `variants` (each with its `weight`, 1 by default, and its `whatsapp_template`
    or null); raises VariantError. Each template's own rules are checked by the caller."""
    if not MIN_VARIANTS <= len(variants) <= MAX_VARIANTS:
        raise VariantError("variants", f"must hold {MIN_VARIANTS} to {MAX_VARIANTS} variants")
    names = set()
    stored = []
    for index, variant in enumerate(variants):
        name = variant["name"]
        if not NAME.match(name):
            raise VariantError(f"variants.{index}.name", "1 to 40 letters, digits, _ or -")
        if name in names:
            raise VariantError(f"variants.{index}.name", f"{name} names another variant too")
        names.add(name)
        weight = variant.get("weight", 1)
        if not 1 <= weight <= MAX_WEIGHT:
            raise VariantError(f"variants.{index}.weight", f"must be 1 to {MAX_WEIGHT}")
        if variant.get("whatsapp_template") is not None and channel != "whatsapp":
            raise VariantError(f"variants.{index}.whatsapp_template", "only a whatsapp campaign sends one")
        stored.append(
            {
                "name": name,
                "base_template": variant["base_template"],
                "whatsapp_template": variant.get("whatsapp_template"),
                "weight": weight,
            }
        )
    return stored


def _thresholds(variants: list[dict]) -> list[tuple[int, str]]:
    """Each variant's name with the end of its share of the weights' sum, in order."""
    total, out = 0, []
    for variant in variants:
        total += variant["weight"]
        out.append((total, variant["name"]))
    return out


def choose(variants: list[dict], campaign_id: int, customer_id: int) -> str:
    """The variant of the customer in the campaign (what `assignment` computes in SQL)."""
    thresholds = _thresholds(variants)
    point = ((customer_id * _MULTIPLIER + _offset(campaign_id)) % _SPACE) * thresholds[-1][0] // _SPACE
    return next(name for end, name in thresholds if point < end)


def assignment(variants: list[dict] | None, campaign_id: int, customer_id) -> ColumnElement[str | None]:
    """SQL choosing each customer's variant from `customer_id` (a column): `choose`, as one expression; null
    without variants."""
    if not variants:
        return literal(None)
    thresholds = _thresholds(variants)

    def constant(value: int):
        return literal_column(str(value), BigInteger)

    hashed = (customer_id * constant(_MULTIPLIER) + constant(_offset(campaign_id))) % constant(_SPACE)
    point = hashed * constant(thresholds[-1][0]) // constant(_SPACE)
    whens = [(point < constant(end), literal(name)) for end, name in thresholds[:-1]]
    return case(*whens, else_=literal(thresholds[-1][1]))


def named(variants: list[dict] | None, name: str | None) -> dict | None:
    return next((variant for variant in variants or () if variant["name"] == name), None)


def for_message(row: dict) -> dict:
    """A claimed message's row with its variant's templates in place of the campaign's (unchanged when it
    has none, or is an SMS fallback, which has its own)."""
    variant = named(row.get("variants"), row.get("variant"))
    if variant is None or row.get("fallback_for") is not None:
        return row
    return {**row, "base_template": variant["base_template"], "whatsapp_template": variant["whatsapp_template"]}
