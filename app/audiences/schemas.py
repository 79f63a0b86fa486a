from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.models import Channel
from app.schemas import Id, PageQuerySchema, Text, UTCDateTime

FILTER = {
    "description": "A filter (docs/api.md#filters): a condition `{field, op, value}`, a group `{all: [...]}`, "
    '`{any: [...]}`, `{not: {...}}`, an engagement `{campaign, event}`, `{messaged_within: "7d"}` or '
    '`{opted_out: "sms"}`.',
    "example": {
        "all": [
            {"field": "location", "op": "in", "value": ["Nairobi", "Mombasa"]},
            {"field": "attributes.tier", "op": "eq", "value": "gold"},
            {"not": {"messaged_within": "7d"}},
        ]
    },
}


class SegmentSchema(Schema):
    id = fields.Integer(dump_only=True)
    name = Text(required=True, validate=validate.Length(min=1, max=200))
    filter = fields.Dict(required=True, metadata=FILTER)
    created_at = UTCDateTime(dump_only=True)
    updated_at = UTCDateTime(dump_only=True)


class SegmentQuerySchema(PageQuerySchema):
    pass


class AudienceCountRequestSchema(Schema):
    filter = fields.Dict(metadata=FILTER)
    segment_id = Id()

    @validates_schema
    def exactly_one(self, data, **kwargs):
        if len(data) != 1:
            raise ValidationError("Give exactly one of `filter` or `segment_id`.")


class AudienceCountSchema(Schema):
    customers = fields.Integer(required=True, metadata={"description": "Customers the audience matches now."})
    opted_out = fields.Dict(
        keys=fields.String(validate=validate.OneOf(Channel.ALL)),
        values=fields.Integer(),
        required=True,
        metadata={
            "description": "Of those, how many are opted out of each channel.",
            "example": {"sms": 3, "whatsapp": 0},
        },
    )
    frequency_capped = fields.Integer(
        required=True,
        metadata={"description": "Of those, how many FREQUENCY_CAP would hold back from a send now (0: no cap)."},
    )
