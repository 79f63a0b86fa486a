"""Request bodies over their limit, sent to the Procfile's web process (gunicorn) with raw HTTP:
a 413 that changes nothing, with `Content-Length` or chunked."""

import json

import pytest

from app.extensions import db
from app.models import Customer
from tests.conftest import TEST_API_KEY
from tests.helpers import raw_request

pytestmark = pytest.mark.real_only

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
LIMIT = 100_000


def customer_count() -> int:
    db.session.rollback()
    return db.session.scalar(db.select(db.func.count()).select_from(Customer))


def csv_body(rows: int) -> bytes:
    lines = "".join(f"+2547{n:08d},First{n},Last{n},Nairobi,Product{n % 50}\n" for n in range(rows))
    return ("phone,first_name,last_name,location,preferred_product\n" + lines).encode()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_import_over_its_limit_is_413_and_imports_nothing(app, spawn_web, chunked):
    web = spawn_web(IMPORT_MAX_CONTENT_LENGTH=LIMIT, IMPORT_BATCH_SIZE=100)
    body = csv_body(3000)  # about 150 KB: 30 batches would fit under the limit
    assert len(body) > LIMIT
    status, _, answer = raw_request(
        web, "POST", "/customers/import", body, {**AUTH, "Content-Type": "text/csv"}, chunked=chunked
    )
    assert status == 413
    assert f"over the limit of {LIMIT} bytes" in json.loads(answer)["message"]
    assert customer_count() == 0


def test_import_at_its_limit_is_imported(app, spawn_web):
    body = csv_body(1000)
    web = spawn_web(IMPORT_MAX_CONTENT_LENGTH=len(body))
    status, _, answer = raw_request(
        web, "POST", "/customers/import", body, {**AUTH, "Content-Type": "text/csv"}, chunked=True
    )
    assert status == 200, answer
    assert json.loads(answer)["created"] == 1000


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_json_body_over_the_limit_is_413_never_truncated_and_processed(app, spawn_web, chunked):
    web = spawn_web(MAX_CONTENT_LENGTH=LIMIT)
    # Valid JSON at any cut past the object: a body truncated at the limit would still parse.
    body = json.dumps({"phone": "0712000001", "first_name": "Amina"}).encode() + b" " * (LIMIT + 50_000)
    status, _, answer = raw_request(
        web, "POST", "/customers", body, {**AUTH, "Content-Type": "application/json"}, chunked=chunked
    )
    assert status == 413, answer
    assert json.loads(answer)["code"] == 413
    assert customer_count() == 0


def test_chunked_json_body_under_the_limit_is_processed(app, spawn_web):
    web = spawn_web(MAX_CONTENT_LENGTH=LIMIT)
    body = json.dumps({"phone": "0712000001", "first_name": "Amina"}).encode() + b" " * (LIMIT - 100)
    status, _, answer = raw_request(
        web, "POST", "/customers", body, {**AUTH, "Content-Type": "application/json"}, chunked=True, chunk_size=4096
    )
    assert status == 201, answer
    assert customer_count() == 1
