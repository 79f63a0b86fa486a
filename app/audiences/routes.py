from flask.views import MethodView

from app.audiences import segments
from app.audiences.schemas import AudienceCountRequestSchema, AudienceCountSchema, SegmentQuerySchema, SegmentSchema
from app.blueprint import Blueprint
from app.schemas import ErrorSchema, page_of

bp = Blueprint("audiences", __name__, description="Saved segments and audience counts")

SEGMENT = "/segments/<int(max=2147483647):segment_id>"


@bp.route("/segments")
class Segments(MethodView):
    @bp.arguments(SegmentQuerySchema, location="query")
    @bp.response(200, page_of(SegmentSchema))
    def get(self, query):
        """List saved segments, newest first"""
        return segments.list_segments(**query)

    @bp.arguments(SegmentSchema)
    @bp.response(201, SegmentSchema)
    def post(self, data):
        """Save a segment: a filter with a name"""
        return segments.create_segment(data)


@bp.route(SEGMENT)
class SegmentById(MethodView):
    @bp.response(200, SegmentSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown segment")
    def get(self, segment_id):
        """Get a segment"""
        return segments.get_segment(segment_id)

    @bp.arguments(SegmentSchema(partial=True))
    @bp.response(200, SegmentSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown segment")
    def patch(self, data, segment_id):
        """Rename a segment or change its filter"""
        return segments.update_segment(segment_id, data)

    @bp.response(204)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown segment")
    @bp.alt_response(409, schema=ErrorSchema, description="A scheduled campaign evaluates it when it fires")
    def delete(self, segment_id):
        """Delete a segment no scheduled campaign waits on"""
        segments.delete_segment(segment_id)


@bp.route("/audiences/count", methods=["POST"])
@bp.arguments(AudienceCountRequestSchema)
@bp.response(200, AudienceCountSchema)
def count(data):
    """Count the customers a filter or segment matches now: opted out per channel, held back by the cap"""
    return segments.count(data)
