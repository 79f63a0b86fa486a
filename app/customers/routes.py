from typing import IO

from flask import current_app, jsonify, request, url_for
from flask.views import MethodView

from app.blueprint import Blueprint
from app.bodies import spool
from app.customers import import_jobs, service
from app.customers.csv_import import COLUMNS
from app.customers.schemas import (
    CustomerImportSchema,
    CustomerQuerySchema,
    CustomerSchema,
    ImportReportSchema,
    OptOutRequestSchema,
)
from app.errors import ValidationFailed
from app.idempotency import idempotent
from app.models import CustomerImport
from app.schemas import ErrorSchema, page_of

bp = Blueprint("customers", __name__, url_prefix="/customers", description="Customers who receive campaigns")


@bp.route("")
class Customers(MethodView):
    @bp.arguments(CustomerQuerySchema, location="query")
    @bp.response(200, page_of(CustomerSchema))
    def get(self, query):
        """List customers, newest first"""
        return service.list_customers(**query)

    @idempotent(bp)
    @bp.arguments(CustomerSchema)
    @bp.response(201, CustomerSchema)
    @bp.alt_response(409, schema=ErrorSchema, description="Phone already taken, or Idempotency-Key conflict")
    def post(self, data):
        """Create a customer"""
        return service.create_customer(data)


@bp.route("/<int(max=2147483647):customer_id>")
class CustomerById(MethodView):
    @bp.response(200, CustomerSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown customer")
    def get(self, customer_id):
        """Get a customer"""
        return service.get_customer(customer_id)

    @bp.arguments(CustomerSchema(partial=True))
    @bp.response(200, CustomerSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown customer")
    @bp.alt_response(409, schema=ErrorSchema, description="Phone already taken")
    def patch(self, data, customer_id):
        """Change some fields of a customer"""
        return service.update_customer(customer_id, data)

    @bp.response(204)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown customer")
    @bp.alt_response(409, schema=ErrorSchema, description="The customer has messages in campaigns")
    def delete(self, customer_id):
        """Delete a customer who has no messages"""
        service.delete_customer(customer_id)


@bp.route("/<int(max=2147483647):customer_id>/opt-out", methods=["POST"])
@bp.arguments(OptOutRequestSchema)
@bp.response(200, CustomerSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown customer")
def opt_out(data, customer_id):
    """Opt the customer out of a channel: no campaign messages them there (idempotent: the first time is kept)"""
    return service.opt_out(customer_id, data["channel"])


@bp.route("/<int(max=2147483647):customer_id>/opt-in", methods=["POST"])
@bp.arguments(OptOutRequestSchema)
@bp.response(200, CustomerSchema)
@bp.alt_response(404, schema=ErrorSchema, description="Unknown customer")
def opt_in(data, customer_id):
    """Opt the customer back in to a channel (idempotent)"""
    return service.opt_in(customer_id, data["channel"])


CSV_BODY = {
    "required": True,
    "content": {
        "text/csv": {
            "schema": {"type": "string"},
            "example": ",".join(COLUMNS) + "\n0712345678,Amina,Otieno,Nairobi,Sneakers",
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
IMPORT_LOCATION = {
    "Location": {"schema": {"type": "string"}, "description": "The import resource: `/customers/imports/{import_id}`."}
}


def _upload() -> IO[bytes]:
    """The CSV of the request, whole in a temporary file: a body over `IMPORT_MAX_CONTENT_LENGTH` is a
    413 before anything is imported, whatever its transfer encoding."""
    request.max_content_length = current_app.config["IMPORT_MAX_CONTENT_LENGTH"]
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")  # parsed into a temporary file, under the same limit
        if upload is None:
            raise ValidationFailed("multipart body has no `file` field", {"file": ["Missing data for required field."]})
        return upload.stream
    if request.mimetype in ("text/csv", "text/plain", "application/csv"):
        return spool(request.stream)
    raise ValidationFailed("send the CSV as a text/csv body or as a multipart/form-data field named `file`")


@bp.route("/import", methods=["POST"])
@bp.doc(requestBody=CSV_BODY)
@bp.response(200, ImportReportSchema)
@bp.alt_response(
    202,
    schema=CustomerImportSchema,
    headers=IMPORT_LOCATION,
    success=True,
    description="Over IMPORT_SYNC_MAX_BYTES: queued as a job; follow `Location` for its progress and report",
)
@bp.alt_response(422, schema=ErrorSchema, description="Not CSV, or a bad header line; nothing imported")
def import_csv():
    """Create or update customers from CSV (upsert by phone); bad rows are reported, good rows kept"""
    with _upload() as upload:
        result = import_jobs.import_upload(upload)
    if isinstance(result, CustomerImport):
        location = url_for("customers.CustomerImportById", import_id=result.id)
        return jsonify(CustomerImportSchema().dump(result)), 202, {"Location": location}
    return result


@bp.route("/imports/<int(max=2147483647):import_id>")
class CustomerImportById(MethodView):
    @bp.response(200, CustomerImportSchema)
    @bp.alt_response(404, schema=ErrorSchema, description="Unknown import")
    def get(self, import_id):
        """Get an import that runs as a job: its status, progress and report"""
        return import_jobs.get_import(import_id)
