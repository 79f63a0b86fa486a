from flask.views import MethodView

from app.blueprint import Blueprint
from app.campaigns import service
from app.campaigns.schemas import (
    CampaignDetailSchema,
    CampaignListItemSchema,
    CampaignQuerySchema,
    CampaignSchema,
    EstimateSchema,
    MessageQuerySchema,
    MessageSchema,
    PreviewRequestSchema,
    PreviewSchema,
    RetryFailedResultSchema,
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
@bp.response(200, RetryFailedResultSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown campaign")
@bp.alt_response(
    409, schema=ErrorSchema, description="Campaign not sending, sent or failed; or Idempotency-Key conflict"
)
def retry_failed(campaign_id):
    """Send again the failed and undelivered messages whose failure was not permanent, with fresh retries"""
    return service.retry_failed(campaign_id)
