from flask import current_app
from flask.views import MethodView

from app.blueprint import Blueprint
from app.campaigns import export, service
from app.campaigns.schemas import (
    CampaignDetailSchema,
    CampaignLinksSchema,
    CampaignListItemSchema,
    CampaignQuerySchema,
    CampaignSchema,
    DeliverySecondsSchema,
    EstimateSchema,
    MessageExportQuerySchema,
    MessageQuerySchema,
    MessageSchema,
    PreviewRequestSchema,
    PreviewSchema,
    RetryFailedResultSchema,
    RetryFailedSchema,
    SendResultSchema,
    SendSchema,
)
from app.idempotency import idempotent
from app.schemas import ErrorSchema, page_of

bp = Blueprint("campaigns", __name__, url_prefix="/campaigns", description="Campaigns, sending and their messages")

CAMPAIGN = "/<int(max=2147483647):campaign_id>"


@bp.route("")
class Campaigns(MethodView):
    @bp.arguments(CampaignQuerySchema, location="query")
    @bp.response(200, page_of(CampaignListItemSchema))
    def get(self, query):
        """List campaigns, newest first, each with its stats"""
        return service.list_campaigns(**query)

    @idempotent(bp)
    @bp.arguments(CampaignSchema)
    @bp.response(201, CampaignDetailSchema)
    def post(self, data):
        """Create a campaign (draft, or scheduled when `scheduled_at` is given)"""
        return service.create_campaign(data)


@bp.route(CAMPAIGN)
class CampaignById(MethodView):
    @bp.response(200, CampaignDetailSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
    def get(self, campaign_id):
        """Get a campaign with its message stats"""
        return service.with_stats(service.get_campaign(campaign_id))

    @bp.arguments(CampaignSchema(partial=True))
    @bp.response(200, CampaignDetailSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
    @bp.alt_response(409, schema=ErrorSchema, description="Campaign is no longer draft or scheduled")
    def patch(self, data, campaign_id):
        """Change a draft or scheduled campaign; `scheduled_at: null` unschedules it"""
        return service.update_campaign(campaign_id, data)


@bp.route(CAMPAIGN + "/delivery-seconds")
@bp.response(200, DeliverySecondsSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
def delivery_seconds(campaign_id):
    """Seconds from sent to delivered of the campaign's delivered messages: median and 95th percentile"""
    return service.delivery_seconds(campaign_id)


@bp.route(CAMPAIGN + "/links")
@bp.response(200, CampaignLinksSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
def links(campaign_id):
    """The campaign's links: for each original URL, its messages, clicks, messages clicked and click rate"""
    return service.link_stats(campaign_id)


@bp.route(CAMPAIGN + "/send", methods=["POST"])
@idempotent(bp)
@bp.arguments(SendSchema)
@bp.response(202, SendResultSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(409, schema=ErrorSchema, description="Campaign already finished, or Idempotency-Key conflict")
def send(data, campaign_id):
    """Send the campaign to customers (ids, or an audience)"""
    return service.send_campaign(campaign_id, **data)


@bp.route(CAMPAIGN + "/estimate", methods=["POST"])
@bp.arguments(SendSchema)
@bp.response(200, EstimateSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(409, schema=ErrorSchema, description="Campaign can no longer be sent")
def estimate(data, campaign_id):
    """Count what sending with this body would send, and its cost; stores and queues nothing"""
    return service.estimate(campaign_id, **data)


@bp.route(CAMPAIGN + "/personalized-preview", methods=["POST"])
@bp.arguments(PreviewRequestSchema)
@bp.response(200, PreviewSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign or customer")
def personalized_preview(data, campaign_id):
    """Render the campaign for one customer; stores and queues nothing"""
    return service.preview(campaign_id, data["customer_id"])


@bp.route(CAMPAIGN + "/messages")
@bp.arguments(MessageQuerySchema, location="query")
@bp.response(200, page_of(MessageSchema))
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
def messages(query, campaign_id):
    """List the campaign's outbound messages, newest first"""
    return service.list_messages(campaign_id, **query)


CSV_EXAMPLE = ",".join(export.HEADER) + (
    "\n17,5,+254711000222,failed,21211,\"Invalid 'To' Phone Number\",0,,"
    "2026-12-03T15:04:05.123456Z,,,2026-12-03T15:04:06.654321Z\n"
)


@bp.route(CAMPAIGN + "/messages.csv")
@bp.arguments(MessageExportQuerySchema, location="query")
@bp.response(
    200,
    {"type": "string"},
    content_type="text/csv",
    description="Every message of the campaign (or those in `status`), by id, with a header line; timestamps in "
    "ISO 8601 UTC. Streamed: an error after the first byte ends the download short (no final chunk).",
    example=CSV_EXAMPLE,
    headers={
        "Content-Disposition": {
            "schema": {"type": "string"},
            "description": '`attachment; filename="campaign-{campaign_id}-messages.csv"`',
        }
    },
)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
def messages_csv(query, campaign_id):
    """Export the campaign's messages as CSV, by id, optionally of one status; streamed"""
    chunks = export.campaign_csv(campaign_id, query.get("status"))
    return current_app.response_class(
        chunks, mimetype="text/csv", headers={"Content-Disposition": export.content_disposition(campaign_id)}
    )


# The delivery controls (docs/api.md#pause-resume-cancel): each answers the campaign as GET does. A control
# repeated on a campaign already where it leads answers it unchanged; one its status does not allow is a 409.


@bp.route(CAMPAIGN + "/pause", methods=["POST"])
@bp.response(200, CampaignDetailSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(409, schema=ErrorSchema, description="Campaign is not sending, scheduled or paused")
def pause(campaign_id):
    """Pause a sending or scheduled campaign: no further message goes to a provider until it is resumed"""
    return service.pause_campaign(campaign_id)


@bp.route(CAMPAIGN + "/resume", methods=["POST"])
@bp.response(200, CampaignDetailSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(409, schema=ErrorSchema, description="Campaign is not paused, sending or scheduled")
def resume(campaign_id):
    """Resume a paused campaign: its pending messages are queued again (or it waits for its scheduled time)"""
    return service.resume_campaign(campaign_id)


@bp.route(CAMPAIGN + "/cancel", methods=["POST"])
@bp.response(200, CampaignDetailSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(409, schema=ErrorSchema, description="Campaign already sent or failed")
def cancel(campaign_id):
    """Cancel a campaign for good: its pending messages are canceled; sends in flight finish"""
    return service.cancel_campaign(campaign_id)


@bp.route(CAMPAIGN + "/retry-failed", methods=["POST"])
@idempotent(bp)
@bp.arguments(RetryFailedSchema, required=False)
@bp.response(200, RetryFailedResultSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(
    409, schema=ErrorSchema, description="Campaign not sending, sent or failed; or Idempotency-Key conflict"
)
def retry_failed(data, campaign_id):
    """Send again the failed and undelivered messages whose failure was not permanent, with fresh retries"""
    return service.retry_failed(campaign_id, include_unknown=data.get("include_unknown", False))
