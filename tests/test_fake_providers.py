"""The fake providers themselves: each endpoint's answers and errors, scripting, recording, and callbacks signed
so that the providers' own checks accept them. Real HTTP (httpx) against a running fake and a small local receiver
standing in for the service; no app, no database."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from twilio.request_validator import RequestValidator

from tests.fake_providers import FakeProviders, accept, hang, refuse, segments, server_error, throttle

AT_NUMBER = "+254711000001"
WA_TO = "254711000002"


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    url: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}


@dataclass
class Receiver:
    """A stand-in for the service's webhooks: records each request and answers `status` with `body`."""

    url: str = ""
    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local HTTP server recording the callbacks it gets."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            with state.lock:
                state.received.append(
                    Received(
                        self.command,
                        state.url + self.path,
                        parts.path,
                        {k: v[-1] for k, v in parse_qs(parts.query).items()},
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        time.monotonic(),
                    )
                )
            time.sleep(state.delay)
            self.send_response(state.status)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        do_POST = do_GET = _record

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def fake(receiver) -> Iterator[FakeProviders]:
    """The fake providers, started, posting callbacks to the receiver."""
    with FakeProviders(webhook_token="hook-token") as providers:
        providers.callback_base_url = receiver.url
        yield providers


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """An HTTP client with a short timeout (one for the module: building its TLS context takes a while)."""
    with httpx.Client(timeout=5) as client:
        yield client


def at_send(fake: FakeProviders, http: httpx.Client, to: str = AT_NUMBER, message: str = "Hello", **overrides):
    headers = {"apiKey": overrides.pop("api_key", fake.at_api_key), "Accept": "application/json"}
    form = {"username": fake.at_username, "to": to, "message": message, "from": "SHOP", **overrides}
    return http.post(f"{fake.base_url}/version1/messaging", data=form, headers=headers)


def twilio_send(fake: FakeProviders, http: httpx.Client, to: str = "+254711000003", auth=None, **form):
    data = {"To": to, "From": "+15005550006", "Body": "Hello", **form}
    url = f"{fake.base_url}/2010-04-01/Accounts/{fake.twilio_account_sid}/Messages.json"
    return http.post(url, data=data, auth=auth or (fake.twilio_account_sid, fake.twilio_auth_token))


def wa_send(fake: FakeProviders, http: httpx.Client, body: dict | None = None, token: str | None = None, **kwargs):
    body = body or {"messaging_product": "whatsapp", "to": WA_TO, "type": "text", "text": {"body": "Hello"}}
    url = f"{fake.base_url}/v21.0/{kwargs.get('phone_number_id', fake.whatsapp_phone_number_id)}/messages"
    headers = {"Authorization": f"Bearer {token or fake.whatsapp_access_token}"}
    return http.post(url, json=body, headers=headers, timeout=kwargs.get("timeout", 5))


# -- Africa's Talking


def test_africastalking_accepts_with_201_and_a_recipient_message_id(fake, http):
    answer = at_send(fake, http)
    assert answer.status_code == 201
    assert answer.headers["content-type"] == "application/json"  # the official SDK compares it exactly
    data = answer.json()["SMSMessageData"]
    assert data["Message"] == "Sent to 1/1 Total Cost: KES 0.8000"
    [recipient] = data["Recipients"]
    assert recipient["statusCode"] == 101 and recipient["status"] == "Success"
    assert recipient["number"] == AT_NUMBER and recipient["cost"] == "KES 0.8000"
    assert recipient["messageId"].startswith("ATXid_") and len(recipient["messageId"]) == 6 + 32


def test_africastalking_refusal_is_a_recipient_status_in_a_201(fake, http):
    fake.script("africastalking", AT_NUMBER, refuse(406))
    answer = at_send(fake, http)
    assert answer.status_code == 201
    data = answer.json()["SMSMessageData"]
    assert data["Message"] == "Sent to 0/1 Total Cost: 0"
    assert data["Recipients"] == [
        {"cost": "0", "messageId": "None", "number": AT_NUMBER, "status": "UserInBlacklist", "statusCode": 406}
    ]


def test_africastalking_do_not_disturb_refusal_answers_409(fake, http):
    fake.script("africastalking", AT_NUMBER, refuse(409))
    answer = at_send(fake, http)
    assert answer.status_code == 409
    assert answer.json()["SMSMessageData"]["Recipients"][0]["status"] == "DoNotDisturbRejection"


def test_africastalking_answers_each_of_several_recipients(fake, http):
    fake.script("africastalking", "+254711000009", refuse(403))
    answer = at_send(fake, http, to=f"{AT_NUMBER},+254711000009,0711000010")
    data = answer.json()["SMSMessageData"]
    assert data["Message"] == "Sent to 1/3 Total Cost: KES 0.8000"
    assert [r["statusCode"] for r in data["Recipients"]] == [101, 403, 403]  # a national number is refused too
    assert fake.requests("africastalking")[-1].message_ids == [data["Recipients"][0]["messageId"]]


def test_africastalking_wrong_api_key_or_username_gets_401_text(fake, http):
    for answer in (at_send(fake, http, api_key="wrong"), at_send(fake, http, username="someone-else")):
        assert answer.status_code == 401
        assert answer.text == "The supplied authentication is invalid"
    assert at_send(fake, http, message="").status_code == 400


def test_africastalking_answers_xml_to_a_client_that_does_not_ask_for_json(fake, http):
    form = {"username": fake.at_username, "to": AT_NUMBER, "message": "Hello"}
    answer = http.post(f"{fake.base_url}/version1/messaging", data=form, headers={"apiKey": fake.at_api_key})
    assert answer.status_code == 201 and answer.text.startswith("<?xml")


# -- Twilio


def test_twilio_accepts_with_201_queued_and_an_sm_sid(fake, http):
    answer = twilio_send(fake, http, Body="x" * 161, StatusCallback="https://example.test/cb")
    assert answer.status_code == 201
    message = answer.json()
    assert message["sid"].startswith("SM") and len(message["sid"]) == 34
    assert message["status"] == "queued" and message["num_segments"] == "2"
    assert (message["to"], message["from"]) == ("+254711000003", "+15005550006")
    assert message["error_code"] is None and message["error_message"] is None
    assert message["account_sid"] == fake.twilio_account_sid and message["api_version"] == "2010-04-01"


def test_twilio_messaging_service_answers_accepted_without_a_sender_yet(fake, http):
    data = {"To": "+254711000003", "MessagingServiceSid": "MG" + "1" * 32, "Body": "Hello"}
    url = f"{fake.base_url}/2010-04-01/Accounts/{fake.twilio_account_sid}/Messages.json"
    message = http.post(url, data=data, auth=(fake.twilio_account_sid, fake.twilio_auth_token)).json()
    assert (message["status"], message["from"], message["num_segments"]) == ("accepted", None, "0")


def test_twilio_refusal_and_invalid_number_answer_400_with_code_and_more_info(fake, http):
    fake.script("twilio", "+254711000003", refuse(21610))
    answer = twilio_send(fake, http)
    assert answer.status_code == 400
    assert answer.json() == {
        "code": 21610,
        "message": "Attempt to send to unsubscribed recipient",
        "more_info": "https://www.twilio.com/docs/errors/21610",
        "status": 400,
    }
    invalid = twilio_send(fake, http, to="0711000003")
    assert (invalid.status_code, invalid.json()["code"]) == (400, 21211)
    assert twilio_send(fake, http, Body="").json()["code"] == 21602


def test_twilio_wrong_credentials_get_401_code_20003(fake, http):
    answer = twilio_send(fake, http, auth=(fake.twilio_account_sid, "wrong"))
    assert answer.status_code == 401
    assert answer.json()["code"] == 20003 and answer.json()["status"] == 401
    assert fake.requests("twilio")[-1].outcome == "auth_error"


def test_segments_count_gsm7_and_ucs2():
    assert [segments("a" * 160), segments("a" * 161), segments("€" * 80), segments("é" * 160)] == [1, 2, 1, 1]
    assert [segments("ж" * 70), segments("ж" * 71), segments("😀" * 35), segments("😀" * 36)] == [1, 2, 1, 2]


# -- WhatsApp Cloud API


def test_whatsapp_accepts_text_and_template_with_200_and_a_wamid(fake, http):
    answer = wa_send(fake, http)
    assert answer.status_code == 200
    data = answer.json()
    assert data["messaging_product"] == "whatsapp"
    assert data["contacts"] == [{"input": WA_TO, "wa_id": WA_TO}]
    assert data["messages"][0]["id"].startswith("wamid.")
    template = {
        "messaging_product": "whatsapp",
        "to": "+254 711 000002",  # Meta accepts '+' and spaces, and answers the digits as wa_id
        "type": "template",
        "template": {
            "name": "spring_sale",
            "language": {"code": "en"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "Amina"}]}],
        },
    }
    answer = wa_send(fake, http, template)
    assert answer.status_code == 200 and answer.json()["contacts"][0]["wa_id"] == WA_TO


@pytest.mark.parametrize(
    "body",
    [
        {"to": WA_TO, "type": "text", "text": {"body": "Hi"}},
        {"messaging_product": "sms", "to": WA_TO, "type": "text", "text": {"body": "Hi"}},
        {"messaging_product": "whatsapp", "to": "Amina", "type": "text", "text": {"body": "Hi"}},
        {"messaging_product": "whatsapp", "to": WA_TO, "type": "text", "text": "Hi"},
        {"messaging_product": "whatsapp", "to": WA_TO, "type": "template", "template": {"name": "sale"}},
        {
            "messaging_product": "whatsapp",
            "to": WA_TO,
            "type": "template",
            "template": {
                "name": "sale",
                "language": {"code": "en"},
                "components": [{"type": "body", "parameters": [{"type": "text", "value": "Amina"}]}],
            },
        },
        {"messaging_product": "whatsapp", "to": WA_TO, "type": "sms", "sms": {}},
    ],
    ids=["no-product", "wrong-product", "bad-to", "text-not-object", "no-language", "param-no-text", "bad-type"],
)
def test_whatsapp_malformed_body_gets_400_code_100(fake, http, body):
    answer = wa_send(fake, http, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == (100, "OAuthException")
    assert error["error_data"]["messaging_product"] == "whatsapp" and error["error_data"]["details"]
    assert error["fbtrace_id"]


def test_whatsapp_wrong_token_gets_401_code_190_and_unknown_number_id_400(fake, http):
    answer = wa_send(fake, http, token="wrong")
    assert answer.status_code == 401 and answer.json()["error"]["code"] == 190
    answer = wa_send(fake, http, phone_number_id="999")
    assert answer.status_code == 400 and answer.json()["error"]["error_subcode"] == 33


def test_whatsapp_refusal_answers_meta_error_envelope(fake, http):
    fake.script("whatsapp", WA_TO, refuse(131047))
    answer = wa_send(fake, http)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == 131047 and error["message"] == "(#131047) Re-engagement message"
    assert set(error) == {"message", "type", "code", "error_data", "fbtrace_id"}


# -- scripting


def test_a_scripted_sequence_is_used_in_order_and_its_last_outcome_repeats(fake, http):
    fake.script("twilio", "+254711000003", server_error(), throttle(retry_after=None), accept())
    statuses = [twilio_send(fake, http).status_code for _ in range(4)]
    assert statuses == [500, 429, 201, 201]
    assert [r.outcome for r in fake.requests("twilio")] == ["server_error", "throttle", "accept", "accept"]
    assert twilio_send(fake, http, to="+254711000004").status_code == 201  # unscripted numbers are accepted


def test_scripting_ignores_the_number_format(fake, http):
    fake.script("whatsapp", "+254711000002", server_error(503))
    answer = wa_send(fake, http)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == 2


def test_throttle_answers_each_providers_signal_with_retry_after(fake, http):
    for provider, to in (("twilio", "+254711000003"), ("whatsapp", WA_TO), ("africastalking", AT_NUMBER)):
        fake.script(provider, to, throttle(retry_after=7))
    twilio = twilio_send(fake, http)
    assert (twilio.status_code, twilio.json()["code"], twilio.headers["retry-after"]) == (429, 20429, "7")
    whatsapp = wa_send(fake, http)  # Meta documents HTTP 400 for its throughput error
    assert (whatsapp.status_code, whatsapp.json()["error"]["code"], whatsapp.headers["retry-after"]) == (
        400,
        130429,
        "7",
    )
    at = at_send(fake, http)
    assert (at.status_code, at.headers["retry-after"]) == (429, "7")


def test_hang_outlasts_a_client_read_timeout(fake, http):
    fake.script("whatsapp", WA_TO, hang(10), accept())
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        wa_send(fake, http, timeout=httpx.Timeout(5, read=0.5))
    assert time.monotonic() - started < 8  # the client's 0.5 s, not the fake's 10 s
    assert fake.requests("whatsapp")[-1].status is None  # received, never answered
    assert wa_send(fake, http).status_code == 200  # the next attempt is answered meanwhile


def test_latency_delays_every_answer(fake, http):
    fake.latency = 0.3
    started = time.monotonic()
    assert twilio_send(fake, http, auth=("x", "y")).status_code == 401
    assert time.monotonic() - started >= 0.3


# -- recording


def test_requests_records_each_request_in_order_with_its_answer(fake, http):
    at_send(fake, http, message="first")
    fake.script("africastalking", AT_NUMBER, server_error())
    at_send(fake, http, message="second")
    first, second = fake.requests("africastalking")
    assert (first.params["message"], second.params["message"]) == ("first", "second")
    assert first.params["to"] == AT_NUMBER and first.params["from"] == "SHOP"
    assert first.headers["apikey"] == fake.at_api_key and first.headers["accept"] == "application/json"
    assert first.path == "/version1/messaging" and first.status == 201
    assert first.message_id == first.answer["SMSMessageData"]["Recipients"][0]["messageId"]
    assert (second.status, second.message_id, second.outcome) == (500, None, "server_error")
    wa_send(fake, http)
    assert fake.requests("whatsapp")[0].params["text"] == {"body": "Hello"}
    assert fake.requests("twilio") == []


def test_concurrent_sends_are_all_recorded(fake, http):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: twilio_send(fake, http, to=f"+2547110001{i:02d}"), range(40)))
    recorded = fake.requests("twilio")
    assert len(recorded) == 40 and all(a.status_code == 201 for a in answers)
    assert {r.message_id for r in recorded} == {a.json()["sid"] for a in answers}


# -- callbacks


def test_africastalking_receipt_is_a_form_with_the_webhook_token(fake, http, receiver):
    message_id = at_send(fake, http).json()["SMSMessageData"]["Recipients"][0]["messageId"]
    answer = fake.send_receipt("africastalking", message_id, "Failed", failure_reason="UserInBlackList")
    assert (answer.status, answer.body) == (200, "ok")
    [got] = receiver.received
    assert got.path == "/webhooks/africastalking/delivery" and got.query == {"token": "hook-token"}
    assert got.form() == {
        "id": message_id,
        "status": "Failed",
        "phoneNumber": AT_NUMBER,
        "networkCode": "63902",
        "retryCount": "0",
        "failureReason": "UserInBlackList",
    }
    fake.send_receipt("africastalking", message_id, "Success", failure_reason="ignored", token=None)
    assert "failureReason" not in receiver.received[-1].form() and receiver.received[-1].query == {}


def test_twilio_receipt_signature_validates_with_twilios_request_validator(fake, http, receiver):
    callback = f"{receiver.url}/webhooks/twilio/status?message=42"
    sid = twilio_send(fake, http, StatusCallback=callback).json()["sid"]
    fake.send_receipt("twilio", sid, "undelivered", error_code=30003)
    got = receiver.received[-1]
    params = got.form()
    assert got.url == callback
    assert params["MessageSid"] == params["SmsSid"] == sid
    assert params["MessageStatus"] == "undelivered" and params["ErrorCode"] == "30003"
    assert params["ApiVersion"] == "2010-04-01" and params["AccountSid"] == fake.twilio_account_sid
    assert (params["To"], params["From"]) == ("+254711000003", "+15005550006")
    assert len(params["RawDlrDoneDate"]) == 10  # a parameter the service may not know: signed all the same
    validator = RequestValidator(fake.twilio_auth_token)
    assert validator.validate(got.url, params, got.headers["x-twilio-signature"])

    fake.send_receipt("twilio", sid, "sent", auth_token="wrong-token")
    assert not validator.validate(
        callback, receiver.received[-1].form(), receiver.received[-1].headers["x-twilio-signature"]
    )
    fake.send_receipt("twilio", sid, "sent", sign=False)
    assert "x-twilio-signature" not in receiver.received[-1].headers


def test_twilio_receipt_without_status_callback_goes_to_the_default_url(fake, http, receiver):
    sid = twilio_send(fake, http).json()["sid"]
    fake.send_receipt("twilio", sid, "delivered")
    assert receiver.received[-1].path == "/webhooks/twilio/status"


def test_whatsapp_receipts_are_signed_hmac_sha256_of_the_raw_body(fake, http, receiver):
    first = wa_send(fake, http).json()["messages"][0]["id"]
    second = wa_send(fake, http).json()["messages"][0]["id"]
    fake.send_receipts("whatsapp", [(first, "delivered"), (second, "failed", [131050]), (first, "read")])
    got = receiver.received[-1]
    expected = hmac.new(fake.whatsapp_app_secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-hub-signature-256"] == f"sha256={expected}"
    envelope = json.loads(got.body)
    assert envelope["object"] == "whatsapp_business_account"
    [change] = envelope["entry"][0]["changes"]
    assert change["field"] == "messages" and change["value"]["metadata"]["phone_number_id"] == "1234567890"
    statuses = change["value"]["statuses"]
    assert [(s["id"], s["status"], s["recipient_id"]) for s in statuses] == [
        (first, "delivered", WA_TO),
        (second, "failed", WA_TO),
        (first, "read", WA_TO),
    ]
    assert statuses[1]["errors"][0]["code"] == 131050

    fake.send_receipt("whatsapp", first, "failed", app_secret="wrong")
    got = receiver.received[-1]
    assert json.loads(got.body)["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"][0]["code"] == 131026
    assert (
        got.headers["x-hub-signature-256"]
        != "sha256=" + hmac.new(fake.whatsapp_app_secret.encode(), got.body, hashlib.sha256).hexdigest()
    )


def test_a_receipt_returns_the_services_answer(fake, http, receiver):
    sid = twilio_send(fake, http).json()["sid"]
    receiver.status, receiver.body = 403, b'{"message": "bad signature"}'
    answer = fake.send_receipt("twilio", sid, "delivered")
    assert answer.status == 403 and answer.json() == {"message": "bad signature"}
    assert fake.callbacks("twilio") == [answer]


def test_auto_receipt_is_posted_after_the_answer(fake, http, receiver):
    fake.auto_receipts = {"whatsapp": ["sent", "delivered"]}
    wamid = wa_send(fake, http).json()["messages"][0]["id"]
    fake.drain()
    statuses = [json.loads(r.body)["entry"][0]["changes"][0]["value"]["statuses"][0] for r in receiver.received]
    assert [(s["id"], s["status"]) for s in statuses] == [(wamid, "sent"), (wamid, "delivered")]


def test_auto_receipt_can_arrive_before_the_senders_answer(fake, http, receiver):
    fake.auto_receipts = {"twilio": "delivered"}
    fake.receipts_before_answer = True
    receiver.delay = 0.2
    sid = twilio_send(fake, http).json()["sid"]
    answered = time.monotonic()
    [got] = receiver.received
    assert got.form()["MessageSid"] == sid and got.at < answered
    assert fake.callbacks("twilio")[0].status == 200


def test_verify_webhook_sends_metas_handshake(fake, receiver):
    answer = fake.verify_webhook(receiver.url, "verify-me", "challenge-123")
    assert answer.status == 200
    got = receiver.received[-1]
    assert (got.method, got.path) == ("GET", "/webhooks/whatsapp")
    assert got.query == {"hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "challenge-123"}


def test_stop_closes_the_port():
    fake = FakeProviders().start()
    url = fake.base_url
    fake.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/version1/messaging", timeout=1)


def test_wamid_is_base64_of_the_recipient(fake, http):
    wamid = wa_send(fake, http).json()["messages"][0]["id"]
    assert WA_TO.encode() in base64.b64decode(wamid.removeprefix("wamid."))
