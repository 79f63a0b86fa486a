import io

from flask import current_app, request
from flask.views import MethodView

from app.blueprint import Blueprint
from app.customers import service
from app.customers.importer import COLUMNS, import_customers
from app.customers.schemas import CustomerQuerySchema, CustomerSchema, ImportReportSchema
from app.errors import ValidationFailed
from app.idempotency import idempotent
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


@bp.route("/import", methods=["POST"])
@bp.doc(requestBody=CSV_BODY)
@bp.response(200, ImportReportSchema)
@bp.alt_response(422, schema=ErrorSchema, description="Not CSV, or a bad header line; nothing imported")
def import_csv():
    """Create or update customers from CSV (upsert by phone); bad rows are reported, good rows kept"""
    request.max_content_length = current_app.config["IMPORT_MAX_CONTENT_LENGTH"]
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise ValidationFailed("multipart body has no `file` field", {"file": ["Missing data for required field."]})
        raw = upload.stream
    elif request.mimetype in ("text/csv", "text/plain", "application/csv"):
        raw = request.stream
    else:
        raise ValidationFailed("send the CSV as a text/csv body or as a multipart/form-data field named `file`")
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    return import_customers(text)
