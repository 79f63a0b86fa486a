from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.models import CampaignPriority, CampaignStatus, Channel, ErrorClass, MessageStatus
from app.schemas import Id, PageQuerySchema, Text, UTCDateTime


class MessageCountsSchema(Schema):
    """Each message counted once, under its current status."""

    total = fields.Integer(required=True)
    pending = fields.Integer(
        required=True,
        metadata={"description": "Waiting their turn in PostgreSQL (held by quiet hours among them), no job in Redis."},
    )
    queued = fields.Integer(
        required=True, metadata={"description": "In the campaign's window: their send job is in Redis."}
    )
    sending = fields.Integer(required=True, metadata={"description": "Claimed by a worker: at the provider right now."})
    sent = fields.Integer(required=True, metadata={"description": "Accepted by the provider, no receipt yet."})
    delivered = fields.Integer(required=True)
    undelivered = fields.Integer(required=True)
    failed = fields.Integer(required=True, metadata={"description": "Never accepted, or refused for good."})
    canceled = fields.Integer(required=True, metadata={"description": "Still pending when the campaign was canceled."})
    read = fields.Integer(required=True, metadata={"description": "Delivered ones read (WhatsApp, Twilio)."})
    clicked = fields.Integer(
        required=True, metadata={"description": "Messages whose short links were clicked at least once."}
    )
    clicks = fields.Integer(
        required=True, metadata={"description": "Clicks on the campaign's short links (link-preview fetches left out)."}
    )
    segments_sent = fields.Integer(
        required=True,
        metadata={"description": "SMS segments of the messages a provider accepted (sent, delivered, undelivered)."},
    )
    waiting_quiet_hours = fields.Integer(
        required=True,
        metadata={
            "description": "Pending messages held by QUIET_HOURS in their recipient's time zone, until their "
            "not_before (counted in pending too)."
        },
    )
    held_by_provider = fields.Integer(
        required=True,
        metadata={
            "description": "Pending messages the provider held back to be tried again at their not_before "
            "(WhatsApp 131049: 24 h later, once; counted in pending too)."
        },
    )


def _fallback_count(what: str) -> fields.Integer:
    return fields.Integer(required=True, metadata={"description": f"SMS fallbacks {what} (sms_fallback)."})


class FallbackStatsSchema(Schema):
    """A WhatsApp campaign's SMS fallbacks, counted apart from its own messages (all zero without one)."""

    fallback_total = _fallback_count("created (skipped ones included)")
    fallback_pending = _fallback_count("waiting their turn")
    fallback_queued = _fallback_count("in the campaign's window")
    fallback_sending = _fallback_count("at the SMS provider now")
    fallback_sent = _fallback_count("accepted by the SMS provider, no receipt yet")
    fallback_delivered = _fallback_count("delivered")
    fallback_undelivered = _fallback_count("accepted, then not delivered")
    fallback_failed = _fallback_count("never accepted, or refused for good")
    fallback_canceled = _fallback_count(
        "canceled: the campaign was canceled, or the WhatsApp message was delivered before the fallback went"
    )
    fallback_skipped_opted_out = _fallback_count("not sent because the customer opted out of sms")
    fallback_skipped_frequency_cap = _fallback_count("not sent because FREQUENCY_CAP held them back")
    delivered_after_fallback = fields.Integer(
        required=True,
        metadata={
            "description": "WhatsApp messages delivered after all although their SMS fallback went: what the "
            "fallback cost twice."
        },
    )


class VariantStatsSchema(MessageCountsSchema):
    """One A/B variant's messages: every status, read, clicked, segments and cost."""

    cost = fields.Decimal(
        required=True,
        allow_none=True,
        as_string=True,
        metadata={"description": "SMS: segments_sent x SMS_SEGMENT_PRICE; null for WhatsApp or without a price."},
    )

    class Meta:
        exclude = ("waiting_quiet_hours", "held_by_provider")


class StatsSchema(MessageCountsSchema, FallbackStatsSchema):
    """Each message counted once, under its current status; SMS fallbacks apart."""

    variants = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(VariantStatsSchema),
        required=True,
        metadata={"description": "Per A/B variant (by name), its own messages' counts; empty without variants."},
    )


class DeliverySecondsSchema(Schema):
    """Seconds from sent to delivered over the campaign's delivered messages (continuous percentiles; null
    before the first receipt)."""

    delivered = fields.Integer(required=True, metadata={"description": "Delivered messages with both times."})
    median = fields.Float(allow_none=True, required=True)
    p95 = fields.Float(allow_none=True, required=True, metadata={"description": "The 95th percentile."})


class EncodingSchema(Schema):
    """How an SMS body is encoded and billed (docs/api.md#sms-encoding-and-segments)."""

    encoding = fields.String(required=True, metadata={"enum": ["GSM-7", "UCS-2"]})
    characters = fields.Integer(required=True, metadata={"description": "Characters (Unicode code points)."})
    units = fields.Integer(
        required=True,
        metadata={"description": "Septets for GSM-7 (an extension character counts 2), UTF-16 code units for UCS-2."},
    )
    segments = fields.Integer(required=True, metadata={"description": "SMS parts billed: 160/153 or 70/67."})
    non_gsm_characters = fields.List(
        fields.String(),
        required=True,
        metadata={"description": "The characters that force UCS-2, once each, in order of appearance."},
    )


class TemplateEncodingSchema(EncodingSchema):
    warning = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "Set when the fixed text alone makes every message UCS-2 or longer than one SMS."},
    )


class WhatsAppTemplateSchema(Schema):
    name = Text(required=True, validate=validate.Length(min=1, max=512), metadata={"description": "As approved."})
    language = Text(
        required=True,
        validate=validate.Length(min=2, max=15),
        metadata={"description": "Its language code, e.g. en_US."},
    )


class LastSendSchema(Schema):
    added = fields.Integer(metadata={"description": "Messages the send created so far."})
    skipped_opted_out = fields.Integer(metadata={"description": "Customers left out as opted out of the channel."})
    skipped_frequency_cap = fields.Integer(metadata={"description": "Customers FREQUENCY_CAP left out."})
    adding = fields.Boolean(metadata={"description": "true while it still adds recipients, batch by batch."})
    updated_at = fields.String(metadata={"description": "When its last batch was added (ISO 8601, UTC)."})


class SmsFallbackSchema(Schema):
    base_template = Text(
        required=True,
        multiline=True,
        validate=validate.Length(min=1),
        metadata={"description": "The SMS's template: every rule of an SMS campaign's base_template."},
    )
    on = fields.List(
        fields.String(validate=validate.OneOf(("undeliverable", "window_closed", "not_delivered"))),
        required=True,
        validate=validate.Length(min=1),
        metadata={
            "description": "What triggers it: undeliverable (WhatsApp 131026: the number cannot get WhatsApp), "
            "window_closed (131047: a text outside the 24-hour window), not_delivered (no delivered status "
            "within not_delivered_within of being sent)."
        },
    )
    not_delivered_within = fields.String(
        metadata={"description": "Default 2h: a duration like 30s, 15m, 2h or 1d (at most 7d)."},
    )


class VariantSchema(Schema):
    name = fields.String(
        required=True, metadata={"description": "1 to 40 letters, digits, _ or -; unique in the campaign."}
    )
    base_template = Text(required=True, multiline=True, validate=validate.Length(min=1))
    whatsapp_template = fields.Nested(WhatsAppTemplateSchema, allow_none=True)
    weight = fields.Integer(metadata={"description": "Default 1: its share of the recipients (1 to 1000)."})


class CampaignSchema(Schema):
    id = fields.Integer(dump_only=True)
    name = Text(required=True, validate=validate.Length(min=1, max=200))
    channel = fields.String(required=True, validate=validate.OneOf(Channel.ALL))
    base_template = Text(
        required=True,
        multiline=True,
        validate=validate.Length(min=1),
        metadata={
            "description": "Placeholders: {first_name}, {last_name}, {preferred_product}, {location}. "
            "At most 1,600 characters for sms, 4,096 for whatsapp."
        },
    )
    scheduled_at = UTCDateTime(
        allow_none=True,
        metadata={"description": "ISO 8601, in the future; naive times are UTC. Sets status scheduled."},
    )
    whatsapp_template = fields.Nested(
        WhatsAppTemplateSchema,
        allow_none=True,
        metadata={
            "description": "WhatsApp only: an approved template, sent with one body parameter per placeholder of "
            "base_template, in order. Without it messages go as text, which Meta delivers only within 24 h of the "
            "customer's last message."
        },
    )
    variants = fields.List(
        fields.Nested(VariantSchema),
        allow_none=True,
        metadata={
            "description": "A/B variants: 2 to 5 wordings, each recipient getting one chosen from the campaign "
            "and the customer (the same one always), in proportion to their weights; each message is rendered "
            'from its variant\'s template (docs/api.md, "A/B variants"). null: none.'
        },
    )
    sms_fallback = fields.Nested(
        SmsFallbackSchema,
        allow_none=True,
        metadata={
            "description": "WhatsApp only: an SMS to each customer WhatsApp could not reach, at most one per "
            "WhatsApp message, through everything an SMS goes through (opt-outs, quiet hours, FREQUENCY_CAP, "
            "the SMS provider's limit, retries). null: none (docs/api.md)."
        },
    )
    respect_quiet_hours = fields.Boolean(
        metadata={
            "description": "Default true: no message goes inside QUIET_HOURS in its recipient's local time (it "
            "waits for the window's end). false: sent at any hour (one-time codes, outage notices)."
        },
    )
    priority = fields.String(
        validate=validate.OneOf(CampaignPriority.ALL),
        metadata={
            "description": "Default normal. Its share of the send workers beside other campaigns sending at "
            "once: a high one's window is twice a normal one's, a low one's half (docs/operations.md)."
        },
    )
    ignore_frequency_cap = fields.Boolean(
        metadata={
            "description": "Default false: a send leaves out customers FREQUENCY_CAP holds back. true for "
            "one-time codes and service notices, which go whatever was sent before."
        },
    )
    track_links = fields.Boolean(
        metadata={
            "description": "Default true for a new campaign: each http(s) URL in a message becomes a short link "
            "of its own ({LINK_BASE_URL}/{code}) that counts clicks (docs/api.md). false: bodies go exactly as "
            "rendered."
        },
    )
    segment_id = fields.Integer(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "A scheduled campaign's segment, named by a send: evaluated when it fires (then null)."
        },
    )
    status = fields.String(dump_only=True, metadata={"enum": list(CampaignStatus.ALL)})
    last_send = fields.Nested(
        LastSendSchema,
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "The latest send to an audience: what it added so far, and whether it is still "
            "adding (a large audience's recipients are added in batches after the send's answer). null before "
            "any."
        },
    )
    status_reason = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "Why it failed, when no message says; or why a provider's account-level refusal "
            "paused it (balance, credentials, sender id, template): fix that, then resume."
        },
    )
    created_at = UTCDateTime(dump_only=True)
    updated_at = UTCDateTime(dump_only=True)


class CampaignListItemSchema(CampaignSchema):
    """A campaign in the list: with its stats."""

    stats = fields.Nested(StatsSchema, dump_only=True)


class CampaignDetailSchema(CampaignListItemSchema):
    queued_beside_others = fields.Integer(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "While it sends with messages queued: about how many send jobs of other campaigns "
            "are in the queue beside its own; its messages share the workers with them, and those queued "
            "before run first (a paused or canceled campaign's leftover jobs count until they run, at once "
            "and without sending). null otherwise, or when Redis does not answer."
        },
    )
    template_encoding = fields.Nested(
        TemplateEncodingSchema,
        dump_only=True,
        metadata={
            "description": "SMS only: the encoding and segments of the template's fixed text (placeholders "
            "removed), with a warning; never an error."
        },
    )
    sms_fallback_encoding = fields.Nested(
        TemplateEncodingSchema,
        dump_only=True,
        metadata={"description": "With an sms_fallback: the same for the fallback's template."},
    )


class CampaignQuerySchema(PageQuerySchema):
    status = fields.String(validate=validate.OneOf(CampaignStatus.ALL))
    channel = fields.String(validate=validate.OneOf(Channel.ALL))


FILTER_DESCRIPTION = (
    "The customers a filter matches (docs/api.md#filters): a condition `{field, op, value}`, a group "
    "`{all: [...]}`, `{any: [...]}`, `{not: {...}}`, an engagement `{campaign, event}`, `{messaged_within: "
    '"7d"}` or `{opted_out: "sms"}`.'
)
FILTER_EXAMPLE = {
    "all": [
        {"field": "location", "op": "in", "value": ["Nairobi", "Mombasa"]},
        {"field": "attributes.tier", "op": "eq", "value": "gold"},
        {"not": {"messaged_within": "7d"}},
    ]
}


class AudienceSchema(Schema):
    all = fields.Boolean(metadata={"description": "Every customer."})
    location = Text(validate=validate.Length(min=1, max=100), metadata={"description": "Customers in this location."})
    filter = fields.Dict(metadata={"description": FILTER_DESCRIPTION, "example": FILTER_EXAMPLE})
    segment_id = Id(
        metadata={
            "description": "The customers a saved segment matches; a campaign scheduled ahead evaluates it when "
            "it fires."
        }
    )

    @validates_schema
    def exactly_one(self, data, **kwargs):
        if data.get("all") is False:
            raise ValidationError("`all` must be true when given.", "all")
        if len(data) != 1:
            raise ValidationError("Give exactly one of `all: true`, `location`, `filter` or `segment_id`.")


class SendSchema(Schema):
    customer_ids = fields.List(
        Id(), validate=validate.Length(min=1), metadata={"description": "At most MAX_SEND_IDS ids."}
    )
    audience = fields.Nested(AudienceSchema)

    @validates_schema
    def exactly_one(self, data, **kwargs):
        if ("customer_ids" in data) == ("audience" in data):
            raise ValidationError("Give exactly one of `customer_ids` or `audience`.")


class SendResultSchema(Schema):
    campaign_id = fields.Integer(required=True)
    messages_queued = fields.Integer(
        required=True,
        metadata={
            "description": "Messages this request put in line to be sent: the first window's jobs go to Redis "
            "at once, the rest as the window moves. Less those whose job Redis refused."
        },
    )
    messages_left_for_reconciler = fields.Integer(
        required=True,
        metadata={
            "description": "Messages whose job Redis refused: the reconciler puts them back in line (within "
            "RECONCILE_INTERVAL + STALE_AFTER). 0 normally."
        },
    )
    skipped_opted_out = fields.Integer(
        required=True,
        metadata={
            "description": "Customers of the audience (or ids) opted out of the campaign's channel: no message "
            "was created for them."
        },
    )
    skipped_frequency_cap = fields.Integer(
        required=True,
        metadata={
            "description": "Customers of the audience FREQUENCY_CAP held back (not opted out, not messaged in "
            "this campaign before): no message was created for them. 0 without a cap, or when the campaign "
            "ignores it."
        },
    )
    adding_recipients = fields.Boolean(
        required=True,
        metadata={
            "description": "true: the audience is larger than RECIPIENT_BATCH customers, and the rest of its "
            "recipients are being added after this answer, batch by batch, while the first are sent; the "
            "campaign's `stats` and `last_send` show them as they come, and it ends only once all are added. "
            "The counts here are the first batch's."
        },
    )
    status = fields.String(required=True)
    messages_scheduled = fields.Integer(
        metadata={"description": "Recipients stored for a campaign scheduled in the future."}
    )
    scheduled_at = UTCDateTime()
    segment_id = fields.Integer(
        metadata={"description": "A scheduled campaign's segment, kept to be evaluated when the campaign fires."}
    )
    segment_evaluated_at_fire = fields.Boolean(
        metadata={
            "description": "true: the segment is evaluated when the campaign fires; customers who join or leave "
            "it meanwhile are counted then (nothing is stored now)."
        }
    )


class PreviewRequestSchema(Schema):
    customer_id = Id(required=True)


class PreviewSchema(Schema):
    campaign_id = fields.Integer(required=True)
    customer_id = fields.Integer(required=True)
    rendered_message = fields.String(required=True)
    links = fields.List(
        fields.String(),
        required=True,
        metadata={
            "description": "The URLs its short links lead to, in order (empty without track_links). The preview's "
            "codes are a placeholder of a real code's length; each message gets codes of its own."
        },
    )
    # SMS only (absent for WhatsApp): how the rendered message is encoded and billed.
    encoding = fields.String(metadata={"enum": ["GSM-7", "UCS-2"], "description": "SMS only."})
    characters = fields.Integer(metadata={"description": "SMS only: characters (Unicode code points)."})
    units = fields.Integer(metadata={"description": "SMS only: septets (GSM-7) or UTF-16 code units (UCS-2)."})
    segments = fields.Integer(metadata={"description": "SMS only: the SMS parts it is billed as."})
    non_gsm_characters = fields.List(
        fields.String(), metadata={"description": "SMS only: the characters that force UCS-2, once each."}
    )
    variant = fields.String(metadata={"description": "With A/B variants: the customer's (what the message above is)."})
    variants = fields.List(
        fields.Nested(lambda: VariantPreviewSchema()),
        metadata={"description": "With A/B variants: what each would send this customer."},
    )
    fallback = fields.Nested(
        lambda: FallbackPreviewSchema(),
        metadata={"description": "A campaign with an sms_fallback: the SMS this customer would get instead."},
    )


class VariantPreviewSchema(Schema):
    name = fields.String(required=True)
    rendered_message = fields.String(required=True)
    links = fields.List(fields.String(), required=True)
    encoding = fields.String(metadata={"enum": ["GSM-7", "UCS-2"], "description": "SMS only."})
    characters = fields.Integer()
    units = fields.Integer()
    segments = fields.Integer()
    non_gsm_characters = fields.List(fields.String())


class FallbackPreviewSchema(Schema):
    rendered_message = fields.String(required=True)
    links = fields.List(fields.String(), required=True)
    encoding = fields.String(required=True, metadata={"enum": ["GSM-7", "UCS-2"]})
    characters = fields.Integer(required=True)
    units = fields.Integer(required=True)
    segments = fields.Integer(required=True)
    non_gsm_characters = fields.List(fields.String(), required=True)


class EncodingCountSchema(Schema):
    messages = fields.Integer(required=True)
    segments = fields.Integer(required=True)


class ByEncodingSchema(Schema):
    gsm_7 = fields.Nested(EncodingCountSchema, required=True, attribute="GSM-7", data_key="GSM-7")
    ucs_2 = fields.Nested(EncodingCountSchema, required=True, attribute="UCS-2", data_key="UCS-2")


class EstimateSchema(Schema):
    campaign_id = fields.Integer(required=True)
    channel = fields.String(required=True, metadata={"enum": list(Channel.ALL)})
    recipients = fields.Integer(
        required=True,
        metadata={
            "description": "Customers a send with this body would add now: matching, not yet messaged in the "
            "campaign, not opted out."
        },
    )
    skipped_opted_out = fields.Integer(required=True, metadata={"description": "Matching customers opted out."})
    skipped_frequency_cap = fields.Integer(
        required=True, metadata={"description": "Matching customers FREQUENCY_CAP would hold back now."}
    )
    segments = fields.Integer(required=True, allow_none=True, metadata={"description": "SMS only: in all."})
    by_encoding = fields.Nested(
        ByEncodingSchema,
        required=True,
        allow_none=True,
        metadata={"description": "SMS only: messages and segments per encoding."},
    )
    too_long = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "SMS only: messages over 1,600 characters once rendered; failed unsent, not counted."},
    )
    cost = fields.Decimal(
        required=True,
        allow_none=True,
        as_string=True,
        metadata={"description": "segments x SMS_SEGMENT_PRICE, exact; null when it is not set, or for WhatsApp."},
    )
    currency = fields.String(required=True, allow_none=True, metadata={"description": "CURRENCY (ISO 4217)."})
    variants = fields.List(
        fields.Nested(lambda: VariantEstimateSchema()),
        metadata={"description": "With A/B variants: each one's share (the totals above add them up)."},
    )
    fallback = fields.Nested(
        lambda: FallbackEstimateSchema(),
        required=True,
        allow_none=True,
        metadata={
            "description": "A campaign with an sms_fallback: the worst case, every WhatsApp message falling "
            "back (customers opted out of sms left out). null without one."
        },
    )


class VariantEstimateSchema(Schema):
    name = fields.String(required=True)
    recipients = fields.Integer(required=True)
    segments = fields.Integer(required=True, allow_none=True, metadata={"description": "SMS only."})
    by_encoding = fields.Nested(ByEncodingSchema, required=True, allow_none=True)
    too_long = fields.Integer(required=True, allow_none=True)
    cost = fields.Decimal(required=True, allow_none=True, as_string=True)
    currency = fields.String(required=True, allow_none=True)


class FallbackEstimateSchema(Schema):
    recipients = fields.Integer(required=True, metadata={"description": "SMS fallbacks at most."})
    skipped_opted_out = fields.Integer(required=True, metadata={"description": "Recipients opted out of sms."})
    segments = fields.Integer(required=True)
    by_encoding = fields.Nested(ByEncodingSchema, required=True)
    too_long = fields.Integer(required=True)
    cost = fields.Decimal(required=True, allow_none=True, as_string=True)
    currency = fields.String(required=True, allow_none=True)


class MessageSchema(Schema):
    id = fields.Integer()
    customer_id = fields.Integer()
    channel = fields.String(
        metadata={"enum": list(Channel.ALL), "description": "sms for a fallback, else the campaign's channel."}
    )
    fallback_for = fields.Integer(
        allow_none=True, metadata={"description": "An SMS fallback: the id of the WhatsApp message it replaces."}
    )
    variant = fields.String(allow_none=True, metadata={"description": "Its A/B variant's name; null without."})
    status = fields.String(metadata={"enum": list(MessageStatus.ALL)})
    rendered_content = fields.String(allow_none=True)
    last_error = fields.String(allow_none=True)
    error_code = fields.String(allow_none=True, metadata={"description": "The provider's code for last_error."})
    error_class = fields.String(allow_none=True, metadata={"enum": [*ErrorClass.ALL, None]})
    retry_count = fields.Integer()
    provider = fields.String(allow_none=True, metadata={"description": "Who took it: mock, africastalking, ..."})
    provider_message_id = fields.String(allow_none=True, metadata={"description": "The provider's id for it."})
    sent_at = UTCDateTime(allow_none=True, metadata={"description": "When the provider took it."})
    delivered_at = UTCDateTime(allow_none=True, metadata={"description": "When its receipt said delivered."})
    read_at = UTCDateTime(allow_none=True)
    links = fields.List(
        fields.String(), allow_none=True, metadata={"description": "The URLs its short links lead to, in order."}
    )
    clicks = fields.Integer(metadata={"description": "Clicks on its short links."})
    first_clicked_at = UTCDateTime(allow_none=True, metadata={"description": "When one was first clicked."})
    claimed_by = fields.String(
        allow_none=True,
        metadata={"description": "While sending: the worker (host:pid) that claimed it."},
    )
    lease_until = UTCDateTime(
        allow_none=True,
        metadata={
            "description": "While sending: until when its claim holds; past it the reconciler puts it back in line "
            "(its send in doubt)."
        },
    )
    not_before = UTCDateTime(
        allow_none=True,
        metadata={
            "description": "Set when quiet hours held it: the time it may go (the window's end where its "
            "recipient is); or, with provider_held_at, when the provider's hold ends. Kept once it goes."
        },
    )
    provider_held_at = UTCDateTime(
        allow_none=True,
        metadata={
            "description": "When the provider held it back to be tried again at not_before (WhatsApp 131049: "
            "24 h later, once; held again, it fails)."
        },
    )
    created_at = UTCDateTime()
    updated_at = UTCDateTime()


class MessageQuerySchema(PageQuerySchema):
    status = fields.String(validate=validate.OneOf(MessageStatus.ALL))


class RetryFailedSchema(Schema):
    include_unknown = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Also send again the messages whose outcome is unknown (`error_class` `unknown`: the "
            "request went out and no answer came, so the provider may have them): a recipient may get one twice."
        },
    )


class RetryFailedResultSchema(Schema):
    campaign = fields.Nested(CampaignDetailSchema, required=True)
    requeued = fields.Integer(
        required=True,
        metadata={
            "description": "Failed or undelivered messages whose failure was not permanent: pending again with "
            "fresh retries, and queued."
        },
    )
    not_retryable = fields.Integer(
        required=True,
        metadata={
            "description": "Failed or undelivered messages left as they are: their failure is permanent (invalid "
            "number, opted out, blacklisted, too long, customer gone)."
        },
    )
    unknown_left = fields.Integer(
        required=True,
        metadata={
            "description": "Failed messages whose outcome is unknown, left as they are (send them again with "
            "`include_unknown`: the provider may have them already)."
        },
    )


class MessageExportQuerySchema(Schema):
    status = fields.String(validate=validate.OneOf(MessageStatus.ALL))


class CampaignLinkSchema(Schema):
    url = fields.String(required=True, metadata={"description": "The original URL its short links lead to."})
    messages = fields.Integer(
        required=True, metadata={"description": "Messages that carry it (each with a code of its own)."}
    )
    clicks = fields.Integer(required=True, metadata={"description": "Clicks on it (link-preview fetches left out)."})
    clicked = fields.Integer(required=True, metadata={"description": "Messages in which it was clicked at least once."})
    reached = fields.Integer(
        required=True,
        metadata={"description": "Of its messages, those the rate is over: delivered (or read), or sent (see `over`)."},
    )
    click_rate = fields.Float(
        required=True, allow_none=True, metadata={"description": "clicked / reached; null while none is reached."}
    )


class CampaignLinksSchema(Schema):
    campaign_id = fields.Integer(required=True)
    over = fields.String(
        required=True,
        metadata={
            "enum": ["delivered", "sent"],
            "description": "What the rates are over: delivered messages; sent ones (sent, delivered, undelivered) "
            "when the campaign's provider sends no delivery receipts (none has come).",
        },
    )
    links = fields.List(fields.Nested(CampaignLinkSchema), required=True)
