"""Schema pieces shared by the blueprints: safe strings, ids, UTC timestamps and the page envelope."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.text import text_problem

# PostgreSQL INTEGER; anything larger cannot be an id here.
MAX_ID = 2**31 - 1
MAX_PAGE = 1_000_000


class Text(fields.String):
    """A string the service stores (see `app.text`): no control characters, no bidirectional overrides,
    no lone surrogates (`"\\ud800"` in JSON). A `multiline` one keeps newlines (CRLF becomes LF)."""

    def __init__(self, *, multiline: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.multiline = multiline

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if self.multiline:
            text = text.replace("\r\n", "\n")
        problem = text_problem(text, self.multiline)
        if problem:
            raise ValidationError(problem)
        return text


def Id(**kwargs) -> fields.Integer:  # noqa: N802 - reads as a field type
    """A positive integer id (JSON numbers only, no strings, no floats)."""
    return fields.Integer(strict=True, validate=validate.Range(min=1, max=MAX_ID), **kwargs)


# A day inside Python's datetime range on each side, so that converting a time to UTC and moving it
# by less than a day (rounding a trigger to the second) never overflows.
EARLIEST = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
LATEST = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


class UTCDateTime(fields.AwareDateTime):
    """ISO 8601 in (a naive time is UTC), converted to UTC; UTC with offset out."""

    def __init__(self, **kwargs):
        super().__init__(format="iso", default_timezone=UTC, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:
            moment = None
        if moment is None or not EARLIEST <= moment <= LATEST:
            raise ValidationError(f"Must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC).")
        return moment

    def _serialize(self, value, attr, obj, **kwargs):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return super()._serialize(value.astimezone(UTC) if value else value, attr, obj, **kwargs)


class ErrorSchema(Schema):
    """Every error the API answers (see `app.errors`)."""

    code = fields.Integer(required=True, metadata={"description": "The HTTP status code."})
    status = fields.String(required=True, metadata={"description": "The HTTP status phrase."})
    message = fields.String(required=True, metadata={"description": "What went wrong, for a person."})
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        required=True,
        metadata={
            "description": "Per field or parameter (nested fields dotted: `audience.location`, `customer_ids.0`; "
            "`body` or `query` for the request as a whole), what is wrong with it; empty when no field is at fault."
        },
    )
    missing_customer_ids = fields.List(
        fields.Integer(),
        metadata={"description": "A 422 from a send naming ids of no customer: those ids (the first 1,000)."},
    )
    campaign_status = fields.String(
        metadata={"description": "A 409 about a campaign's status (an edit, a send, a pause, ...): its current status."}
    )


class PageQuerySchema(Schema):
    """A list's page: numbered (`page`, default 1) or after a cursor (`cursor`), not both (app.pagination)."""

    page = fields.Integer(
        validate=validate.Range(min=1, max=MAX_PAGE),
        metadata={"description": "A numbered page (default 1); counts the rows before it."},
    )
    page_size = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(
        validate=validate.Length(min=1, max=200),
        metadata={
            "description": "The `next_cursor` of the page before: the next page, at the cost of the first, "
            "stable while rows are added."
        },
    )

    @validates_schema
    def page_or_cursor(self, data, **kwargs):
        if "page" in data and "cursor" in data:
            raise ValidationError("Give `page` or `cursor`, not both.", "cursor")


class PaginationSchema(Schema):
    page = fields.Integer(required=True, allow_none=True, metadata={"description": "Null on a cursor page."})
    page_size = fields.Integer(required=True)
    total = fields.Integer(
        required=True, allow_none=True, metadata={"description": "Rows in the list; null on a cursor page."}
    )
    total_pages = fields.Integer(required=True, allow_none=True, metadata={"description": "Null on a cursor page."})
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "Pass as `cursor` for the page after this one; null on the last page."},
    )


def page_of(item_schema: type[Schema]) -> type[Schema]:
    """The `{"data": [...], "pagination": {...}}` envelope around `item_schema`."""
    name = item_schema.__name__.removesuffix("Schema") + "PageSchema"
    return Schema.from_dict(
        {
            "data": fields.List(fields.Nested(item_schema), required=True),
            "pagination": fields.Nested(PaginationSchema, required=True),
        },
        name=name,
    )
