"""The filter language: a JSON filter checked and compiled to one SQLAlchemy condition on customers.

Every value is a bound parameter and every field one of `FIELDS` or `attributes.NAME` (a key the attribute
rule allows, itself bound): nothing from the filter is ever written into the SQL text. A condition on a
missing value is false, never unknown: `not` wraps what it negates in `coalesce(..., false)`, so that it
is its exact complement (a customer without a `tier` matches `not tier = gold`), while conditions outside a
`not` stay plain, for the indexes. Attributes compare by the type of the filter's value: a number only
with numbers, text (without case) only with text, a boolean only with booleans; dates are text
`YYYY-MM-DD`, so they compare as dates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, exists, false, func, literal, not_, or_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import Numeric, String

from app import clock
from app.customers.attributes import KEY
from app.errors import ValidationFailed
from app.extensions import db
from app.models import Channel, Customer, CustomerOptOut, MessageStatus, OutboundMessage

TEXT_FIELDS = ("phone", "first_name", "last_name", "location", "preferred_product", "country")
FIELDS = (*TEXT_FIELDS, "created_at")
OPS = ("eq", "ne", "in", "not_in", "contains", "starts_with", "gt", "gte", "lt", "lte", "exists", "missing")
EVENTS = ("sent", "delivered", "read", "clicked", "failed", "not_sent")
MAX_DEPTH = 5
MAX_CONDITIONS = 50
MAX_VALUES = 1000
MAX_TEXT = 500
_WITHIN = re.compile(r"^([1-9][0-9]{0,4})([hd])$")
_ORDERED = ("gt", "gte", "lt", "lte")


class FilterError(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass
class _Count:
    conditions: int = 0


def compile_filter(spec: object, path: str = "filter") -> ColumnElement[bool]:
    """The condition on `Customer` that `spec` means; `ValidationFailed` (422) naming the dotted path of the
    first thing wrong (`audience.filter.all.2.op`)."""
    try:
        return _node(spec, path, 1, _Count(), db.session.get_bind().dialect.name)
    except FilterError as exc:
        raise ValidationFailed(f"{exc.path}: {exc.message}", {exc.path: [exc.message]}) from None


def _node(spec: object, path: str, depth: int, count: _Count, dialect: str) -> ColumnElement[bool]:
    if not isinstance(spec, Mapping) or not spec:
        raise FilterError(path, "must be an object: a condition, a group (all, any, not) or an engagement")
    if depth > MAX_DEPTH:
        raise FilterError(path, f"nested deeper than {MAX_DEPTH} levels")
    keys = set(spec)
    if keys in ({"all"}, {"any"}):
        group = "all" if "all" in keys else "any"
        items = spec[group]
        if not isinstance(items, list) or not items:
            raise FilterError(f"{path}.{group}", "must be a non-empty list of filters")
        parts = [_node(item, f"{path}.{group}.{i}", depth + 1, count, dialect) for i, item in enumerate(items)]
        return and_(*parts) if group == "all" else or_(*parts)
    if keys == {"not"}:
        inner = _node(spec["not"], f"{path}.not", depth + 1, count, dialect)
        return not_(func.coalesce(inner, false()))
    count.conditions += 1
    if count.conditions > MAX_CONDITIONS:
        raise FilterError(path, f"more than {MAX_CONDITIONS} conditions in the filter")
    if "field" in keys:
        return _condition(spec, path, dialect)
    if "campaign" in keys:
        return _engagement(spec, path)
    if keys == {"messaged_within"}:
        return messaged_since(clock.now() - _duration(spec["messaged_within"], f"{path}.messaged_within"))
    if keys == {"opted_out"}:
        channel = spec["opted_out"]
        if channel not in Channel.ALL:
            raise FilterError(f"{path}.opted_out", "must be sms or whatsapp")
        return exists().where(CustomerOptOut.customer_id == Customer.id, CustomerOptOut.channel == channel)
    raise FilterError(
        path,
        "not a filter: expected {field, op, value}, {all: [...]}, {any: [...]}, {not: {...}}, "
        "{campaign, event}, {messaged_within} or {opted_out}",
    )


def _duration(value: object, path: str) -> timedelta:
    match = _WITHIN.match(value) if isinstance(value, str) else None
    if match is None:
        raise FilterError(path, "must be a number of hours or days: 12h, 7d")
    amount = int(match.group(1))
    return timedelta(hours=amount) if match.group(2) == "h" else timedelta(days=amount)


def messaged_since(since: datetime) -> ColumnElement[bool]:
    """Customers with a message sent to them (the provider took it) at or after `since`, on any campaign."""
    return exists().where(OutboundMessage.customer_id == Customer.id, OutboundMessage.sent_at >= since)


def _engagement(spec: Mapping, path: str) -> ColumnElement[bool]:
    if set(spec) != {"campaign", "event"}:
        raise FilterError(path, "an engagement filter is {campaign: ID, event: E}")
    campaign_id = spec["campaign"]
    if not isinstance(campaign_id, int) or isinstance(campaign_id, bool) or not 1 <= campaign_id <= 2**31 - 1:
        raise FilterError(f"{path}.campaign", "must be a campaign id")
    event = spec["event"]
    if event not in EVENTS:
        raise FilterError(f"{path}.event", "must be one of " + ", ".join(EVENTS))
    theirs = and_(OutboundMessage.customer_id == Customer.id, OutboundMessage.campaign_id == campaign_id)
    if event == "not_sent":
        return ~exists().where(theirs, OutboundMessage.status.in_(MessageStatus.ACCEPTED))
    happened = {
        "sent": OutboundMessage.status.in_(MessageStatus.ACCEPTED),
        "delivered": OutboundMessage.status == MessageStatus.DELIVERED,
        "read": OutboundMessage.read_at.is_not(None),
        "clicked": OutboundMessage.first_clicked_at.is_not(None),
        "failed": OutboundMessage.status.in_((MessageStatus.FAILED, MessageStatus.UNDELIVERED)),
    }[event]
    return exists().where(theirs, happened)


def _kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return None


def _checked_value(value: object, path: str, field: str, op: str) -> object:
    """The filter's value for `op` on `field`, checked: a list for in/not_in, one scalar otherwise."""
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value:
            raise FilterError(path, f"{op} takes a non-empty list of values")
        if len(value) > MAX_VALUES:
            raise FilterError(path, f"{len(value)} values, over the limit of {MAX_VALUES}")
        kinds = {_kind(v) for v in value}
        if len(kinds) != 1 or None in kinds:
            raise FilterError(path, "the values must be all strings, all numbers or all booleans")
        for i, v in enumerate(value):
            _checked_scalar(v, f"{path}.{i}", field, op)
        return value
    return _checked_scalar(value, path, field, op)


def _checked_scalar(value: object, path: str, field: str, op: str) -> object:
    kind = _kind(value)
    if kind is None:
        raise FilterError(path, "must be a string, a number or a boolean")
    if kind == "text" and len(value) > MAX_TEXT:
        raise FilterError(path, f"longer than {MAX_TEXT} characters")
    if kind == "number" and value != value:  # NaN
        raise FilterError(path, "must be a number")
    if op in ("contains", "starts_with") and kind != "text":
        raise FilterError(path, f"{op} takes a string")
    if kind == "boolean" and op not in ("eq", "ne", "in", "not_in"):
        raise FilterError(path, f"{op} does not compare booleans")
    if field == "created_at":
        return _moment(value, path)
    if field in TEXT_FIELDS and kind != "text":
        raise FilterError(path, f"{field} compares with a string")
    return value


def _moment(value: object, path: str) -> datetime:
    if isinstance(value, str):
        try:
            moment = (
                datetime.combine(date.fromisoformat(value), datetime.min.time())
                if len(value) == 10
                else datetime.fromisoformat(value)
            )
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        except ValueError:
            pass
    raise FilterError(path, "must be a date or a time in ISO 8601 (2026-11-30, 2026-11-30T08:00:00Z)")


def _condition(spec: Mapping, path: str, dialect: str) -> ColumnElement[bool]:
    extra = set(spec) - {"field", "op", "value"}
    if extra:
        raise FilterError(f"{path}.{sorted(extra)[0]}", "unknown key in a condition")
    field = spec["field"]
    key = None
    if isinstance(field, str) and field.startswith("attributes."):
        key = field.removeprefix("attributes.")
        if not KEY.match(key):
            raise FilterError(f"{path}.field", "not an attribute name")
    elif field not in FIELDS:
        raise FilterError(f"{path}.field", "must be one of " + ", ".join(FIELDS) + " or attributes.NAME")
    op = spec.get("op")
    if op not in OPS:
        raise FilterError(f"{path}.op", "must be one of " + ", ".join(OPS))
    if op in ("exists", "missing"):
        if "value" in spec:
            raise FilterError(f"{path}.value", f"{op} takes no value")
        present = _attribute_present(key, dialect) if key else _field_present(field)
        return present if op == "exists" else ~present
    if "value" not in spec:
        raise FilterError(f"{path}.value", f"{op} needs a value")
    value = _checked_value(spec["value"], f"{path}.value", field, op)
    if key is not None:
        return _attribute_condition(key, op, value, dialect)
    column = getattr(Customer, field)
    if field == "created_at":
        if op in ("contains", "starts_with"):
            raise FilterError(f"{path}.op", f"{op} compares text; created_at is a time")
        return _compare(column, op, value)
    lowered = [v.lower() for v in value] if isinstance(value, list) else value.lower()
    return _compare(func.lower(column), op, lowered)


def _field_present(field: str) -> ColumnElement[bool]:
    column = getattr(Customer, field)
    if field == "created_at":
        return column.is_not(None)
    return and_(column.is_not(None), column != "")


def _compare(column, op: str, value) -> ColumnElement[bool]:
    """`column op value`; a null column makes it null (false in a WHERE, and under `not`, see the module)."""
    if op == "eq":
        return column == value
    if op == "ne":
        return column != value
    if op == "in":
        return column.in_(value)
    if op == "not_in":
        return column.not_in(value)
    if op == "contains":
        return column.contains(value.lower(), autoescape=True)
    if op == "starts_with":
        return column.startswith(value.lower(), autoescape=True)
    return {"gt": column > value, "gte": column >= value, "lt": column < value, "lte": column <= value}[op]


def _attribute_type(key: str, dialect: str):
    """The JSON type of the attribute, named alike on both databases: number, string or boolean (null when
    the customer has none)."""
    if dialect == "postgresql":
        return func.jsonb_typeof(Customer.attributes.op("->", return_type=JSONB)(literal(key, String)))
    kind = func.json_type(Customer.attributes, literal("$." + key, String))
    return case(
        (kind.in_(("integer", "real")), "number"),
        (kind == "text", "string"),
        (kind.in_(("true", "false")), "boolean"),
        else_=None,
    )


def _attribute_value(key: str, dialect: str):
    """The attribute as SQL: text on PostgreSQL (`->>`), its own type on SQLite (`json_extract`)."""
    if dialect == "postgresql":
        return Customer.attributes.op("->>", return_type=String)(literal(key, String))
    return func.json_extract(Customer.attributes, literal("$." + key, String))


def _attribute_present(key: str, dialect: str) -> ColumnElement[bool]:
    return func.coalesce(_attribute_type(key, dialect).in_(("number", "string", "boolean")), false())


def _attribute_condition(key: str, op: str, value, dialect: str) -> ColumnElement[bool]:
    kind = _kind(value[0] if isinstance(value, list) else value)
    kinds = _attribute_type(key, dialect)
    raw = _attribute_value(key, dialect)
    if kind == "number":
        typed = raw.cast(Numeric) if dialect == "postgresql" else raw
        # CASE: the cast only runs on numbers (PostgreSQL gives no order to the parts of an AND).
        return _compare(case((kinds == "number", typed), else_=None), op, value)
    if kind == "boolean":
        flag = case((kinds == "boolean", raw), else_=None)
        if dialect == "postgresql":  # `->>` gives 'true' or 'false'
            words = [str(v).lower() for v in value] if isinstance(value, list) else str(value).lower()
            return _compare(flag, op, words)
        return _compare(flag, op, [int(v) for v in value] if isinstance(value, list) else int(value))  # 1 or 0
    text = func.lower(case((kinds == "string", raw), else_=None))
    lowered = [v.lower() for v in value] if isinstance(value, list) else value.lower()
    return _compare(text, op, lowered)
