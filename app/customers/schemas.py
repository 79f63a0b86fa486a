from marshmallow import Schema, ValidationError, fields, validate

from app.customers import attributes
from app.models import Channel, ImportStatus
from app.schemas import PageQuerySchema, Text, UTCDateTime


def _name(max_length: int) -> Text:
    return Text(allow_none=True, validate=validate.Length(max=max_length))


class Attributes(fields.Dict):
    """A customer's attributes: keys `^[a-z][a-z0-9_]{0,39}$`, values strings (at most 500 characters),
    numbers or booleans; null removes a key (PATCH). The size limits apply to the merged whole (service)."""

    def __init__(self, **kwargs):
        super().__init__(keys=fields.String(), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        errors = {key.removeprefix("attributes."): texts for key, texts in attributes.change_errors(value).items()}
        if errors:
            raise ValidationError(errors)
        return value


class CustomerSchema(Schema):
    id = fields.Integer(dump_only=True)
    phone = Text(
        required=True, validate=validate.Length(min=1, max=32), metadata={"description": "Any format; stored in E.164."}
    )
    first_name = _name(100)
    last_name = _name(100)
    location = _name(100)
    preferred_product = _name(200)
    attributes = Attributes(
        metadata={
            "description": "The business's own data about the customer: up to 50 keys (`^[a-z][a-z0-9_]{0,39}$`), "
            "each a string (at most 500 characters), a number or a boolean; at most 8 KB as JSON. PATCH merges: "
            "keys it does not name are kept, a key set to null is removed. Templates render them as "
            "`{attributes.NAME}`; filters compare them as `attributes.NAME`.",
            "example": {"tier": "gold", "spend": 1250.5, "vip": True, "last_order": "2026-11-30"},
        },
    )
    country = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={"description": "ISO 3166 alpha-2 country of the phone number (`KE`), derived from it."},
    )
    opt_outs = fields.Method(
        "_opt_outs",
        dump_only=True,
        metadata={
            "type": "object",
            "description": "The channels the customer opted out of, each with when and where it came from "
            '(`keyword`, `provider`, `api`, `import`): `{"sms": {"opted_out_at": "...", "source": "keyword"}}`. '
            "No campaign messages them there.",
            "example": {"sms": {"opted_out_at": "2026-12-03T14:00:00+00:00", "source": "keyword"}},
        },
    )
    created_at = UTCDateTime(dump_only=True)
    updated_at = UTCDateTime(dump_only=True)

    def _opt_outs(self, customer) -> dict:
        return {
            o.channel: {"opted_out_at": o.opted_out_at.isoformat(), "source": o.source}
            for o in sorted(customer.opt_outs, key=lambda o: o.channel)
        }


class CustomerQuerySchema(PageQuerySchema):
    location = Text(validate=validate.Length(max=100))
    segment_id = fields.Integer(
        validate=validate.Range(min=1, max=2**31 - 1),
        metadata={"description": "Only the customers a saved segment matches now."},
    )
    filter = fields.String(
        validate=validate.Length(max=4000),
        metadata={
            "description": "Only the customers a filter matches, as JSON (docs/api.md#filters), at most 4,000 "
            'characters (save a longer one as a segment): `{"field": "attributes.tier", "op": "eq", "value": "gold"}`.'
        },
    )
    opted_out = fields.String(
        validate=validate.OneOf(Channel.ALL),
        metadata={"description": "Only customers opted out of this channel (`sms` or `whatsapp`)."},
    )


class OptOutRequestSchema(Schema):
    channel = fields.String(required=True, validate=validate.OneOf(Channel.ALL))


class ImportErrorSchema(Schema):
    line = fields.Integer(required=True)
    reason = fields.String(required=True)


class ImportReportSchema(Schema):
    created = fields.Integer(required=True)
    updated = fields.Integer(required=True)
    invalid = fields.Integer(required=True)
    errors = fields.List(fields.Nested(ImportErrorSchema), required=True, metadata={"description": "First 1,000."})
    errors_truncated = fields.Boolean(required=True)


class CustomerImportSchema(Schema):
    id = fields.Integer(required=True)
    status = fields.String(
        required=True,
        validate=validate.OneOf(ImportStatus.ALL),
        metadata={"description": "queued, running, then done (or failed, with `status_reason`)."},
    )
    status_reason = fields.String(allow_none=True, required=True, metadata={"description": "Why it failed."})
    bytes_total = fields.Integer(required=True, metadata={"description": "Size of the upload."})
    bytes_done = fields.Integer(required=True, metadata={"description": "Bytes of the upload imported so far."})
    lines_done = fields.Integer(required=True, metadata={"description": "Lines of the upload imported so far."})
    report = fields.Nested(
        ImportReportSchema,
        required=True,
        metadata={"description": "Counts and errors so far; the whole report once `done`."},
    )
    created_at = UTCDateTime(required=True)
    updated_at = UTCDateTime(required=True)
    finished_at = UTCDateTime(allow_none=True, required=True)
