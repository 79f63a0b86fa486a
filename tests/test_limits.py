"""Body size, rate limits, string lengths, and what an error may show a client."""

import logging
import time

import pytest
from sqlalchemy.exc import OperationalError

from app import create_app
from app.customers import service as customer_service
from app.extensions import db
from tests.conftest import TEST_API_KEY, TEST_OVERRIDES
from tests.factories import make_campaign


def assert_error_shape(response, code: int) -> dict:
    assert response.status_code == code
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["code"] == code and isinstance(body["status"], str) and isinstance(body["message"], str)
    return body


def test_every_error_names_fields_the_same_way_with_no_request_location(client):
    """`errors` is field -> readable messages whether the field came from the body or the query."""
    body = client.post("/campaigns", json={"name": "x", "channel": "fax", "base_template": "Hi"})
    assert assert_error_shape(body, 422)["errors"] == {"channel": ["Must be one of: sms, whatsapp."]}
    query = client.get("/campaigns?channel=fax")
    assert assert_error_shape(query, 422)["errors"] == {"channel": ["Must be one of: sms, whatsapp."]}
    service = client.post("/campaigns", json={"name": "x", "channel": "sms", "base_template": "Hi {nickname}"})
    assert list(assert_error_shape(service, 422)["errors"]) == ["base_template"]
    campaign = make_campaign()
    nested = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"location": "x" * 101}})
    assert list(assert_error_shape(nested, 422)["errors"]) == ["audience.location"]
    whole = client.post(f"/campaigns/{campaign.id}/send", json={})
    assert assert_error_shape(whole, 422)["errors"] == {"body": ["Give exactly one of `customer_ids` or `audience`."]}
    items = client.post(f"/campaigns/{campaign.id}/send", json={"customer_ids": [1, "two"]})
    assert list(assert_error_shape(items, 422)["errors"]) == ["customer_ids.1"]
    assert assert_error_shape(client.get("/campaigns/999"), 404)["errors"] == {}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_without_the_json_content_type_is_415_naming_it(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/customers", data='{"phone": "0712345678"}', headers=headers)
    assert "Content-Type: application/json" in assert_error_shape(response, 415)["message"]
    assert client.get("/customers").get_json()["pagination"]["total"] == 0


def test_default_body_limit_is_5_mb(app, client):
    assert app.config["MAX_CONTENT_LENGTH"] == 5 * 1024 * 1024
    body = '{"phone": "' + "1" * (5 * 1024 * 1024) + '"}'
    response = client.post("/customers", data=body, content_type="application/json")
    assert "over the limit of 5242880 bytes" in assert_error_shape(response, 413)["message"]


def test_body_over_the_limit_is_413_even_with_an_idempotency_key(app, client):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    response = client.post(
        "/campaigns",
        json={"name": "x" * 2000, "channel": "sms", "base_template": "Hi"},
        headers={"Idempotency-Key": "big"},
    )
    assert_error_shape(response, 413)
    assert client.get("/campaigns").get_json()["pagination"]["total"] == 0


def test_over_the_rate_limit_is_429_with_retry_after(app, client):
    app.config["API_RATE_LIMIT"] = "3 per minute"
    answers = [client.get("/campaigns") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[-1].headers["X-RateLimit-Remaining"] == "0"
    assert all("Retry-After" not in r.headers for r in answers)
    limited = client.get("/customers")  # one budget for the whole API
    assert_error_shape(limited, 429)
    assert 0 < int(limited.headers["Retry-After"]) <= 60


def test_rate_limit_is_per_api_key(app, client):
    app.config["API_KEYS"] = [TEST_API_KEY, "second-key"]
    app.config["API_RATE_LIMIT"] = "2 per minute"
    for _ in range(3):
        client.get("/campaigns")
    assert client.get("/campaigns").status_code == 429
    assert client.get("/campaigns", headers={"Authorization": "Bearer second-key"}).status_code == 200


def test_requests_with_a_wrong_key_are_limited_by_address(app, anonymous_client):
    app.config["API_RATE_LIMIT"] = "2 per minute"
    codes = [
        anonymous_client.get("/campaigns", headers={"Authorization": "Bearer guess"}).status_code for _ in range(3)
    ]
    assert codes == [401, 401, 429]


def test_rate_limit_storage_down_serves_requests_unlimited(app, redis_conn):
    settings = {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"]}
    unlimited = create_app("config.Config", {**settings, "RATELIMIT_STORAGE_URI": "redis://127.0.0.1:1/0"})
    unlimited.extensions["redis"] = redis_conn
    try:
        response = unlimited.test_client().get("/campaigns", headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    finally:
        with unlimited.app_context():
            db.engine.dispose()
    assert response.status_code == 200


@pytest.mark.real_only
def test_stalled_rate_limit_storage_adds_no_wait_to_every_request(app, redis_conn, private_redis):
    socket_timeout = 0.5
    settings = {**TEST_OVERRIDES, "SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"]}
    web = create_app(
        "config.Config",
        {**settings, "RATELIMIT_STORAGE_URI": private_redis.url, "REDIS_SOCKET_TIMEOUT": socket_timeout},
    )
    web.extensions["redis"] = redis_conn
    web.config["API_RATE_LIMIT"] = "5 per minute"
    client = web.test_client()
    private_redis.stall()
    answers, waits = [], []
    try:
        for _ in range(10):
            started = time.monotonic()
            answers.append(client.get("/campaigns", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).status_code)
            waits.append(time.monotonic() - started)
    finally:
        private_redis.resume()
        with web.app_context():
            db.engine.dispose()
    # Redis is waited for once, then looked for again only now and then, not on every request...
    assert len([w for w in waits if w >= socket_timeout]) <= 3, waits
    # ...and the budget still holds, counted in memory meanwhile.
    assert answers == [200] * 5 + [429] * 5


def test_health_and_docs_are_not_rate_limited(app, anonymous_client):
    app.config["API_RATE_LIMIT"] = "1 per minute"
    assert {anonymous_client.get(p).status_code for p in ["/health", "/openapi.json", "/docs"] * 3} == {200}


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/customers", {"phone": "0712345678", "first_name": "x" * 101}, "first_name"),
        ("/customers", {"phone": "1" * 33}, "phone"),
        ("/customers", {"phone": "0712345678", "preferred_product": "x" * 201}, "preferred_product"),
        ("/campaigns", {"name": "x" * 201, "channel": "sms", "base_template": "Hi"}, "name"),
    ],
)
def test_overlong_strings_are_422(client, path, body, field):
    assert field in assert_error_shape(client.post(path, json=body), 422)["message"]


def test_overlong_audience_location_is_422(client):
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/send", json={"audience": {"location": "x" * 101}})
    assert "location" in assert_error_shape(response, 422)["message"]


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000,  # deeper than Python's json can nest
        '{"customer_id": ' + "1" * 5000 + "}",  # more digits than int() takes
        '{"customer_id": 1',
        "\x00",
    ],
)
def test_undecodable_json_is_400_not_500(client, raw):
    campaign = make_campaign()
    response = client.post(f"/campaigns/{campaign.id}/personalized-preview", data=raw, content_type="application/json")
    assert_error_shape(response, 400)


def test_lone_surrogate_in_a_string_is_422_not_500(client):
    response = client.post(
        "/customers", data='{"phone": "0712345678", "first_name": "\\ud800"}', content_type="application/json"
    )
    assert "first_name" in assert_error_shape(response, 422)["message"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/customers", "first_name", "Amina\x1b[31m"),  # an ANSI escape sequence
        ("/customers", "last_name", "Otieno\u202egnp.exe"),  # a right-to-left override
        ("/customers", "location", "Nairobi\nWest"),
        ("/campaigns", "name", "Launch\u2066"),
        ("/campaigns", "base_template", "Hi {first_name}\x07"),
        ("/campaigns", "base_template", "Hi\t{first_name}"),
    ],
)
def test_control_and_bidi_override_characters_are_422(client, path, field, value):
    bodies = {
        "/customers": {"phone": "0712345678"},
        "/campaigns": {"name": "Launch", "channel": "sms", "base_template": "Hi {first_name}"},
    }
    response = client.post(path, json={**bodies[path], field: value})
    assert field in assert_error_shape(response, 422)["message"]
    assert client.get(path).get_json()["pagination"]["total"] == 0


def test_templates_keep_newlines_and_names_keep_joiners_and_marks(client):
    campaign = client.post(
        "/campaigns",
        json={
            "name": "Family \U0001f469\u200d\U0001f467",
            "channel": "sms",
            "base_template": "Hi\r\n{first_name}\nBye",
        },
    )
    assert campaign.status_code == 201, campaign.get_json()
    assert campaign.get_json()["base_template"] == "Hi\n{first_name}\nBye"  # CRLF stored as LF
    customer = client.post("/customers", json={"phone": "0712345678", "first_name": "\u200fأمينة"})
    assert customer.status_code == 201, customer.get_json()


def test_unexpected_error_shows_no_stack_trace_or_sql(client, monkeypatch, caplog):
    def broken(**query):
        raise OperationalError("SELECT secret_column FROM customers", {}, Exception("connection reset"))

    monkeypatch.setattr(customer_service, "list_customers", broken)
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        response = client.get("/customers")
    text = response.get_data(as_text=True)
    assert_error_shape(response, 500)
    for leak in ("SELECT", "secret_column", "Traceback", "connection reset", "sqlalchemy"):
        assert leak not in text
    assert "X-Request-ID" in response.headers
    assert any(r.exc_info for r in caplog.records)  # the log keeps what the client does not see
