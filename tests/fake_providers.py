"""A local fake of the messaging providers: Africa's Talking (SMS), Twilio (SMS) and the WhatsApp Cloud API.

One real HTTP server on 127.0.0.1 speaks each provider's documented request and answer shapes, so the service's
provider clients are exercised over a socket exactly as in production (only the base URL differs). A test scripts
what each recipient number gets (`accept`, `refuse`, `server_error`, `throttle`, `hang`, or a sequence of them),
reads back what each provider received, and has the fake post delivery receipts to the service, signed as the
provider signs them. It depends on nothing of the service: like the real providers, it only knows the wire.

    with FakeProviders(webhook_token="t") as fake:
        fake.script("twilio", "+254711000001", server_error(), accept())
        fake.callback_base_url = live_server
        ...  # point the service at fake.base_url, send
        fake.send_receipt("twilio", fake.requests("twilio")[-1].message_id, "delivered")
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import ceil
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twilio.request_validator import RequestValidator

PROVIDERS = ("africastalking", "twilio", "whatsapp")

# Africa's Talking per-recipient statusCode -> status (its SMS sending documentation).
AT_STATUSES = {
    100: "Processed",
    101: "Success",
    102: "Queued",
    401: "RiskHold",
    402: "InvalidSenderId",
    403: "InvalidPhoneNumber",
    404: "UnsupportedNumberType",
    405: "InsufficientBalance",
    406: "UserInBlacklist",
    407: "CouldNotRoute",
    409: "DoNotDisturbRejection",
    500: "InternalServerError",
    501: "GatewayError",
    502: "RejectedByGateway",
}
AT_AUTH_ERROR = "The supplied authentication is invalid"
# The phone check of the official SDK (africastalking-python, Service.validate_phone).
AT_NUMBER = re.compile(r"^\+\d{1,3}\d{3,}$")

TWILIO_MESSAGES = {
    20003: "Authenticate",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "The 'To' number {to} is not a valid phone number.",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.",
    21602: "Message body is required.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit.",
}
TWILIO_E164 = re.compile(r"^(whatsapp:)?\+[1-9]\d{1,14}$")

WHATSAPP_TITLES = {
    1: "An unknown error occurred",
    2: "Service temporarily unavailable",
    100: "Invalid parameter",
    190: "Access token has expired",
    130429: "Rate limit hit",
    131000: "Something went wrong",
    131026: "Message undeliverable",
    131031: "Business Account locked",
    131047: "Re-engagement message",
    131048: "Spam rate limit hit",
    131050: "User stopped marketing messages",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    132001: "Template name does not exist in the translation",
}
WHATSAPP_ERRORS_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
WHATSAPP_PATH = re.compile(r"^/(v\d+\.\d+)/([^/]+)/messages$")
TWILIO_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+)/Messages\.json$")

GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENSION = set("\f^{}\\[~]|€")

_UNSET: Any = object()  # "use the right secret": distinct from None, which means "send none"


@dataclass(frozen=True)
class Outcome:
    """What the fake does with one attempt to one recipient; build it with the functions below."""

    kind: str  # accept | refuse | server_error | throttle | hang
    code: int | None = None
    status_text: str | None = None
    http_status: int | None = None
    retry_after: int | None = None
    seconds: float = 0.0


def accept() -> Outcome:
    """The provider takes the message and answers its id (the default for an unscripted number)."""
    return Outcome("accept")


def refuse(code: int, status_text: str | None = None, status: int | None = None) -> Outcome:
    """The provider's own refusal: an Africa's Talking recipient statusCode (HTTP 201, or 409 for a
    DoNotDisturbRejection, as documented), a Twilio error code (HTTP 400) or a WhatsApp error code (HTTP 400,
    401 for 190). `status_text` replaces the provider's wording; `status` the HTTP status."""
    return Outcome("refuse", code=code, status_text=status_text, http_status=status)


def server_error(status: int = 500) -> Outcome:
    """The provider fails: HTTP `status` with the provider's error body."""
    return Outcome("server_error", http_status=status)


def throttle(retry_after: int | None = 1, status: int | None = None) -> Outcome:
    """The provider refuses for throughput: Twilio 429 code 20429; WhatsApp code 130429 with HTTP 400, the
    status Meta documents for it; Africa's Talking 429 (it documents no signal of its own). A `Retry-After`
    header is sent unless `retry_after` is None (Twilio and Meta document none: pass None to mimic them)."""
    return Outcome("throttle", retry_after=retry_after, http_status=status)


def hang(seconds: float) -> Outcome:
    """Read the request, answer nothing for `seconds`, then close the connection."""
    return Outcome("hang", seconds=seconds)


@dataclass
class ProviderRequest:
    """One request a provider received, and what the fake answered (`status` None: it hung up)."""

    provider: str
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    params: Any  # the parsed form (one value per name) or JSON body
    raw_body: bytes
    received_at: float  # time.time()
    status: int | None = None
    answer: Any = None  # the parsed JSON answer, or its text
    message_ids: list[str] = field(default_factory=list)
    outcome: str = ""

    @property
    def message_id(self) -> str | None:
        """The provider message id the fake answered, if any (the first, for several recipients)."""
        return self.message_ids[0] if self.message_ids else None


@dataclass
class CallbackResult:
    """A callback the fake posted to the service, and the service's answer (`status` None: no answer)."""

    provider: str
    method: str
    url: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def json(self) -> Any:
        """The service's answer parsed as JSON."""
        return json.loads(self.body)


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    message_ids: list[str] = field(default_factory=list)
    outcome: str = "accept"
    hang: float | None = None


def segments(body: str) -> int:
    """SMS segments for `body`: GSM-7 (extension characters cost two septets) else UCS-2 (UTF-16 units)."""
    if all(c in GSM_BASIC or c in GSM_EXTENSION for c in body):
        units = sum(2 if c in GSM_EXTENSION else 1 for c in body)
        single, multi = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else ceil(units / multi)


def _digits(number: str) -> str:
    return re.sub(r"\D", "", number)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs: a client's connection pool is exercised
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall on a kept-alive socket
    server: _Server

    def do_POST(self) -> None:
        self.server.fake._handle(self)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no line per request
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeProviders


class FakeProviders:
    """The three providers on one local base URL, scripted per recipient, recording what they receive."""

    def __init__(
        self,
        *,
        at_username: str = "sandbox",
        at_api_key: str = "at-test-api-key",
        twilio_account_sid: str = "AC0123456789abcdef0123456789abcdef",
        twilio_auth_token: str = "twilio-test-auth-token",
        whatsapp_access_token: str = "whatsapp-test-access-token",
        whatsapp_phone_number_id: str = "1234567890",
        whatsapp_app_secret: str = "whatsapp-test-app-secret",
        whatsapp_business_account_id: str = "1029384756",
        whatsapp_display_phone_number: str = "15550001111",
        webhook_token: str = "at-test-webhook-token",
        twilio_service_from: str = "+15005550006",
        network_code: str = "63902",
        callback_timeout: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.at_username = at_username
        self.at_api_key = at_api_key
        self.twilio_account_sid = twilio_account_sid
        self.twilio_auth_token = twilio_auth_token
        self.whatsapp_access_token = whatsapp_access_token
        self.whatsapp_phone_number_id = whatsapp_phone_number_id
        self.whatsapp_app_secret = whatsapp_app_secret
        self.whatsapp_business_account_id = whatsapp_business_account_id
        self.whatsapp_display_phone_number = whatsapp_display_phone_number
        self.webhook_token = webhook_token
        self.twilio_service_from = twilio_service_from
        self.network_code = network_code
        self.callback_timeout = callback_timeout
        self.host = host
        self.port = port
        self.latency = 0.0
        self.callback_base_url: str | None = None
        self.auto_receipts: dict[str, str | Sequence[str]] = {}
        self.receipts_before_answer = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scripts: dict[tuple[str, str], list[Outcome]] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._requests: dict[str, list[ProviderRequest]] = {p: [] for p in PROVIDERS}
        self._callbacks: list[CallbackResult] = []
        self._sent: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PROVIDERS}
        self._pending = 0  # automatic receipts still to post after an answer
        self._idle = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeProviders:
        """Listen on `host` (a free port unless one was given) and serve in a background thread."""
        self._stopping.clear()
        self._server = _Server((self.host, self.port), _Handler)
        self._server.fake = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-providers", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: hanging answers end at once, pending automatic receipts get a moment to finish."""
        self._stopping.set()
        self.drain(timeout=2)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeProviders:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Where the three providers answer, e.g. http://127.0.0.1:43123 (the fake must be started)."""
        if self._server is None:
            raise RuntimeError("the fake providers are not started")
        return f"http://{self.host}:{self.port}"

    # -- scripting and recording

    def script(self, provider: str, to: str, *outcomes: Outcome) -> None:
        """What `provider` does with the next attempts to `to` (any format: digits are compared), in order;
        the last outcome repeats. Scripting a number again starts its sequence afresh."""
        self._check(provider)
        if not outcomes:
            raise ValueError("script needs at least one outcome")
        with self._lock:
            self._scripts[(provider, _digits(to))] = list(outcomes)
            self._attempts[(provider, _digits(to))] = 0

    def requests(self, provider: str) -> list[ProviderRequest]:
        """What `provider` received so far, oldest first."""
        self._check(provider)
        with self._lock:
            return list(self._requests[provider])

    def callbacks(self, provider: str | None = None) -> list[CallbackResult]:
        """The callbacks posted to the service (receipts, handshakes), oldest first, with its answers."""
        with self._lock:
            return [c for c in self._callbacks if provider is None or c.provider == provider]

    def clear(self) -> None:
        """Forget scripts, recorded requests, sent messages and callbacks."""
        with self._lock:
            self._scripts.clear()
            self._attempts.clear()
            self._callbacks.clear()
            for provider in PROVIDERS:
                self._requests[provider].clear()
                self._sent[provider].clear()

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the automatic receipts posted after an answer have been delivered."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _next_outcome(self, provider: str, to: str) -> Outcome:
        key = (provider, _digits(to))
        with self._lock:
            outcomes = self._scripts.get(key)
            if not outcomes:
                return accept()
            attempt = self._attempts[key]
            self._attempts[key] = attempt + 1
            return outcomes[min(attempt, len(outcomes) - 1)]

    @staticmethod
    def _check(provider: str) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}: one of {', '.join(PROVIDERS)}")

    # -- the HTTP side

    def _handle(self, handler: _Handler) -> None:
        """Read one request, route it to its provider, answer as scripted, post automatic receipts."""
        url = urlsplit(handler.path)
        raw = _read_body(handler)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        provider, route = self._route(handler.command, url.path)
        record = ProviderRequest(provider or "", handler.command, handler.path, headers, None, raw, time.time())
        if provider is not None:
            record.params = _parse(raw, headers.get("content-type", ""))
            with self._lock:
                self._requests[provider].append(record)
        reply = route(record) if route is not None else _text(404, "Not Found", outcome="not_found")
        record.outcome = reply.outcome
        if reply.hang is not None:
            self._stopping.wait(reply.hang)
            handler.close_connection = True
            return
        if self.latency:
            self._stopping.wait(self.latency)
        statuses = self.auto_receipts.get(provider or "") if reply.message_ids else None
        if statuses and self.receipts_before_answer:
            self._auto_receipts(provider, reply.message_ids, statuses)
        record.status, record.message_ids, record.answer = reply.status, reply.message_ids, _answer(reply)
        after = bool(statuses) and not self.receipts_before_answer
        if after:
            with self._lock:  # counted before the answer leaves: a drain() right after it waits for them
                self._pending += 1
        _write(handler, reply)
        if after:
            threading.Thread(target=self._auto_receipts, args=(provider, reply.message_ids, statuses, True)).start()

    def _route(self, method: str, path: str) -> tuple[str | None, Any]:
        if method != "POST":
            return None, None
        if path == "/version1/messaging":
            return "africastalking", self._africastalking
        if TWILIO_PATH.match(path):
            return "twilio", self._twilio
        if WHATSAPP_PATH.match(path):
            return "whatsapp", self._whatsapp
        return None, None

    def _auto_receipts(
        self, provider: str | None, message_ids: list[str], statuses: str | Sequence[str], counted: bool = False
    ) -> None:
        try:
            for message_id in message_ids:
                for status in [statuses] if isinstance(statuses, str) else statuses:
                    try:
                        self.send_receipt(provider or "", message_id, status)
                    except Exception:  # recorded in callbacks(), where a test reads it
                        pass
        finally:
            if counted:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    # -- Africa's Talking

    def _africastalking(self, record: ProviderRequest) -> _Reply:
        form = record.params if isinstance(record.params, dict) else {}
        if record.headers.get("apikey") != self.at_api_key or form.get("username", self.at_username) != (
            self.at_username
        ):
            return _text(401, AT_AUTH_ERROR, outcome="auth_error")
        for name in ("username", "to", "message"):
            if not form.get(name):
                return _text(400, f"Request is missing required form field '{name}'", outcome="invalid")
        numbers = [n.strip() for n in str(form["to"]).split(",") if n.strip()]
        outcomes = [self._next_outcome("africastalking", n) for n in numbers]
        failure = next((o for o in outcomes if o.kind in ("server_error", "throttle", "hang")), None)
        if failure is not None:
            return self._africastalking_failure(failure)
        parts = segments(str(form["message"]))
        recipients, ids, refused = [], [], []
        for number, outcome in zip(numbers, outcomes, strict=True):
            if outcome.kind == "accept" and not AT_NUMBER.match(number):
                outcome = refuse(403)  # the real API refuses what is not an international number
            if outcome.kind == "refuse":
                code = outcome.code or 403
                refused.append(code)
                status = outcome.status_text or AT_STATUSES.get(code, "Failed")
                recipients.append(
                    {"cost": "0", "messageId": "None", "number": number, "status": status, "statusCode": code}
                )
                continue
            message_id = f"ATXid_{secrets.token_hex(16)}"
            ids.append(message_id)
            self._remember("africastalking", message_id, {"to": number, "from": form.get("from")})
            recipients.append(
                {
                    "cost": f"KES {0.8 * parts:.4f}",
                    "messageId": message_id,
                    "messageParts": parts,
                    "number": number,
                    "status": "Success",
                    "statusCode": 101,
                }
            )
        total = f"KES {0.8 * parts * len(ids):.4f}" if ids else "0"
        answer = {
            "SMSMessageData": {
                "Message": f"Sent to {len(ids)}/{len(numbers)} Total Cost: {total}",
                "Recipients": recipients,
            }
        }
        # Documented for DoNotDisturbRejection: HTTP 409 with the usual body; other refusals come with 201.
        status = 409 if refused and not ids and all(c == 409 for c in refused) else 201
        if not record.headers.get("accept", "").startswith("application/json"):
            return _Reply(status, _at_xml(answer), "application/xml", message_ids=ids, outcome=_kind(ids, refused))
        return _json(status, answer, message_ids=ids, outcome=_kind(ids, refused), content_type="application/json")

    @staticmethod
    def _africastalking_failure(outcome: Outcome) -> _Reply:
        if outcome.kind == "hang":
            return _Reply(0, b"", "", outcome="hang", hang=outcome.seconds)
        if outcome.kind == "throttle":
            return _text(outcome.http_status or 429, "Too Many Requests", _retry(outcome), outcome="throttle")
        return _text(outcome.http_status or 500, "Internal Server Error", outcome="server_error")

    # -- Twilio

    def _twilio(self, record: ProviderRequest) -> _Reply:
        path_sid = TWILIO_PATH.match(urlsplit(record.path).path).group(1)  # type: ignore[union-attr]
        user, token = _basic_auth(record.headers.get("authorization", ""))
        if user is None:
            return self._twilio_error(401, 20003, "Authentication Error - No credentials provided", auth=True)
        if (user, token) != (self.twilio_account_sid, self.twilio_auth_token) or path_sid != user:
            return self._twilio_error(401, 20003, "Authentication Error - invalid username", auth=True)
        form = record.params if isinstance(record.params, dict) else {}
        to, sender, service, body = form.get("To"), form.get("From"), form.get("MessagingServiceSid"), form.get("Body")
        if not to:
            return self._twilio_error(400, 21604)
        if not TWILIO_E164.match(to):
            return self._twilio_error(400, 21211, to=to)
        if not sender and not service:
            return self._twilio_error(400, 21603)
        if not body and not form.get("MediaUrl") and not form.get("ContentSid"):
            return self._twilio_error(400, 21602)
        if body and len(body) > 1600:
            return self._twilio_error(400, 21617)
        outcome = self._next_outcome("twilio", to)
        if outcome.kind == "hang":
            return _Reply(0, b"", "", outcome="hang", hang=outcome.seconds)
        if outcome.kind == "throttle":
            return self._twilio_error(outcome.http_status or 429, 20429, extra=_retry(outcome), outcome="throttle")
        if outcome.kind == "server_error":
            status = outcome.http_status or 500
            return self._twilio_error(status, 20503 if status == 503 else 20500, outcome="server_error")
        if outcome.kind == "refuse":
            code = outcome.code or 21211
            return self._twilio_error(outcome.http_status or 400, code, outcome.status_text, to=to, outcome="refuse")
        sid = f"SM{secrets.token_hex(16)}"
        now = formatdate(usegmt=False).replace("-0000", "+0000")
        self._remember(
            "twilio",
            sid,
            {
                "to": to,
                "from": sender or self.twilio_service_from,
                "status_callback": form.get("StatusCallback"),
                "messaging_service_sid": service,
            },
        )
        uri = f"/2010-04-01/Accounts/{user}/Messages/{sid}.json"
        answer = {
            "account_sid": user,
            "api_version": "2010-04-01",
            "body": body or "",
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            # A Messaging Service picks the sender later: no `from` and 0 segments at first (Twilio's docs).
            "from": None if service and not sender else sender,
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": "0" if service else str(segments(body or "")),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": f"{uri[:-5]}/Media.json"},
            "to": to,
            "uri": uri,
        }
        return _json(201, answer, message_ids=[sid])

    def _twilio_error(
        self,
        status: int,
        code: int,
        message: str | None = None,
        *,
        to: str = "",
        auth: bool = False,
        extra: dict[str, str] | None = None,
        outcome: str = "invalid",
    ) -> _Reply:
        body: dict[str, Any] = {
            "code": code,
            "message": message or TWILIO_MESSAGES.get(code, f"Error {code}").format(to=to),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        headers = dict(extra or {})
        if auth:
            body["detail"] = "Your AccountSid or AuthToken was incorrect."
            headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
        return _json(status, body, headers=headers, outcome="auth_error" if auth else outcome)

    # -- WhatsApp Cloud API

    def _whatsapp(self, record: ProviderRequest) -> _Reply:
        phone_number_id = WHATSAPP_PATH.match(urlsplit(record.path).path).group(2)  # type: ignore[union-attr]
        if record.headers.get("authorization") != f"Bearer {self.whatsapp_access_token}":
            error = {
                "message": "Invalid OAuth access token - Cannot parse access token",
                "type": "OAuthException",
                "code": 190,
                "fbtrace_id": _fbtrace(),
            }
            return _json(401, {"error": error}, outcome="auth_error", content_type="application/json; charset=UTF-8")
        if phone_number_id != self.whatsapp_phone_number_id:
            message = (
                f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded due "
                "to missing permissions, or does not support this operation."
            )
            error = {
                "message": message,
                "type": "GraphMethodException",
                "code": 100,
                "error_subcode": 33,
                "fbtrace_id": _fbtrace(),
            }
            return _json(400, {"error": error}, outcome="invalid", content_type="application/json; charset=UTF-8")
        problem = _whatsapp_problem(record.params)
        if problem is not None:
            return _whatsapp_error(400, 100, problem, outcome="invalid")
        body = record.params
        to = body["to"]
        outcome = self._next_outcome("whatsapp", to)
        if outcome.kind == "hang":
            return _Reply(0, b"", "", outcome="hang", hang=outcome.seconds)
        if outcome.kind == "throttle":
            details = "Message failed to send because there were too many messages sent from this phone number."
            return _whatsapp_error(outcome.http_status or 400, 130429, details, _retry(outcome), outcome="throttle")
        if outcome.kind == "server_error":
            status = outcome.http_status or 500
            code = 2 if status == 503 else 131000
            return _whatsapp_error(status, code, WHATSAPP_TITLES[code], outcome="server_error")
        if outcome.kind == "refuse":
            code = outcome.code or 131026
            status = outcome.http_status or (401 if code == 190 else 400)
            details = outcome.status_text or WHATSAPP_TITLES.get(code, f"Error {code}")
            return _whatsapp_error(status, code, details, outcome="refuse")
        wa_id = _digits(to)
        wamid = _wamid(wa_id)
        category = "marketing" if body.get("type") == "template" else "service"
        self._remember("whatsapp", wamid, {"to": to, "recipient_id": wa_id, "category": category})
        answer = {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": wa_id}],
            "messages": [{"id": wamid}],
        }
        return _json(200, answer, message_ids=[wamid], content_type="application/json; charset=UTF-8")

    def _remember(self, provider: str, message_id: str, details: dict[str, Any]) -> None:
        with self._lock:
            self._sent[provider][message_id] = details

    def _message(self, provider: str, message_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._sent[provider].get(message_id, {}))

    # -- callbacks to the service

    def send_receipt(self, provider: str, message_id: str, status: str, **options: Any) -> CallbackResult:
        """Post one delivery receipt as `provider` does, signed with the service's secret; the options are
        those of `africastalking_receipt`, `twilio_receipt` or `whatsapp_receipt`. Returns the service's answer."""
        self._check(provider)
        if provider == "africastalking":
            return self.africastalking_receipt(message_id, status, **options)
        if provider == "twilio":
            return self.twilio_receipt(message_id, status, **options)
        return self.whatsapp_receipt(message_id, status, **options)

    def send_receipts(self, provider: str, receipts: Iterable[tuple], **options: Any) -> CallbackResult:
        """Post many WhatsApp statuses in one request, as Meta may: `receipts` holds (wamid, status) or
        (wamid, status, errors) tuples. The SMS providers post one receipt per request."""
        if provider != "whatsapp":
            raise ValueError(f"{provider} posts one receipt per request: use send_receipt")
        statuses = [self._whatsapp_status(*receipt) for receipt in receipts]
        return self._post_whatsapp(statuses, **options)

    def africastalking_receipt(
        self,
        message_id: str,
        status: str,
        *,
        failure_reason: str | None = None,
        phone: str | None = None,
        network_code: str | None = None,
        retry_count: int | None = 0,
        token: Any = _UNSET,
        url: str | None = None,
    ) -> CallbackResult:
        """Africa's Talking's delivery report: a form POST of id, status (Sent, Submitted, Buffered, Success,
        Failed, Rejected...), phoneNumber, networkCode, retryCount (None: left out; its docs tie it to premium
        SMS) and failureReason, which only comes with Rejected or Failed. To
        {callback_base_url}/webhooks/africastalking/delivery?token=<webhook_token>; `token=None` leaves the
        token out, another value sends a wrong one."""
        phone = phone or self._message("africastalking", message_id).get("to")
        if phone is None:
            raise ValueError(f"unknown Africa's Talking message {message_id}: pass phone=")
        params = {
            "id": message_id,
            "status": status,
            "phoneNumber": phone,
            "networkCode": network_code or self.network_code,
        }
        if retry_count is not None:
            params["retryCount"] = str(retry_count)
        if failure_reason is not None and status in ("Rejected", "Failed"):
            params["failureReason"] = failure_reason
        token = self.webhook_token if token is _UNSET else token
        if url is None:
            url = self._callback_url("/webhooks/africastalking/delivery")
            if token is not None:
                url += "?" + urlencode({"token": token})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self._post("africastalking", url, urlencode(params).encode(), headers)

    def twilio_receipt(
        self,
        sid: str,
        status: str,
        *,
        error_code: int | str | None = None,
        to: str | None = None,
        from_: str | None = None,
        extra: dict[str, str] | None = None,
        sign: bool = True,
        auth_token: str | None = None,
        url: str | None = None,
    ) -> CallbackResult:
        """Twilio's status callback: a form POST to the message's StatusCallback (else
        {callback_base_url}/webhooks/twilio/status) of MessageSid, SmsSid, MessageStatus, SmsStatus, AccountSid,
        From, To, ApiVersion, ErrorCode when given, MessagingServiceSid for a service's message, RawDlrDoneDate
        (YYMMDDhhmm) with delivered and undelivered, and `extra`; signed in X-Twilio-Signature over the exact URL
        (`sign=False`: unsigned; `auth_token`: signed with that secret instead)."""
        sent = self._message("twilio", sid)
        to = to or sent.get("to")
        if to is None:
            raise ValueError(f"unknown Twilio message {sid}: pass to=")
        params = {
            "AccountSid": self.twilio_account_sid,
            "ApiVersion": "2010-04-01",
            "From": from_ or sent.get("from") or self.twilio_service_from,
            "MessageSid": sid,
            "MessageStatus": status,
            "SmsSid": sid,
            "SmsStatus": status,
            "To": to,
        }
        if sent.get("messaging_service_sid"):
            params["MessagingServiceSid"] = sent["messaging_service_sid"]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        if status in ("delivered", "undelivered"):
            params["RawDlrDoneDate"] = time.strftime("%y%m%d%H%M", time.gmtime())
        params.update(extra or {})
        url = url or sent.get("status_callback") or self._callback_url("/webhooks/twilio/status")
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
            "User-Agent": "TwilioProxy/1.1",
        }
        if sign:
            headers["X-Twilio-Signature"] = RequestValidator(auth_token or self.twilio_auth_token).compute_signature(
                url, params
            )
        return self._post("twilio", url, urlencode(params).encode(), headers)

    def whatsapp_receipt(
        self,
        wamid: str,
        status: str,
        *,
        errors: list[int | dict] | None = None,
        recipient_id: str | None = None,
        sign: bool = True,
        app_secret: str | None = None,
        url: str | None = None,
    ) -> CallbackResult:
        """Meta's messages webhook with one status (sent, delivered, read, failed): a JSON POST to
        {callback_base_url}/webhooks/whatsapp signed `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>`
        (`sign=False`: unsigned; `app_secret`: signed with that secret instead). `errors` are error codes or
        error objects; a `failed` status without them carries 131026 (pass [] for none)."""
        return self._post_whatsapp([self._whatsapp_status(wamid, status, errors, recipient_id)], sign, app_secret, url)

    def verify_webhook(
        self, callback_base_url: str | None, verify_token: str, challenge: str, *, mode: str = "subscribe"
    ) -> CallbackResult:
        """Meta's subscription handshake: GET {callback_base_url}/webhooks/whatsapp with hub.mode,
        hub.verify_token and hub.challenge; the service should echo the challenge."""
        query = urlencode({"hub.mode": mode, "hub.verify_token": verify_token, "hub.challenge": challenge})
        base = (callback_base_url or self._callback_url("")).rstrip("/")
        return self._post("whatsapp", f"{base}/webhooks/whatsapp?{query}", b"", {}, method="GET")

    # -- messages customers send (replies, STOP and START)

    def africastalking_inbound(
        self, from_: str, text: str, *, to: str = "12345", token: Any = _UNSET, url: str | None = None
    ) -> CallbackResult:
        """An SMS a customer sent to the account's short code or number, as Africa's Talking forwards it: a
        form POST of from, to, text, date, id, linkId and networkCode to
        {callback_base_url}/webhooks/africastalking/inbound?token=<webhook_token> (`token` as for receipts)."""
        params = {
            "from": from_,
            "to": to,
            "text": text,
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "id": secrets.token_hex(16),
            "linkId": secrets.token_hex(8),
            "networkCode": self.network_code,
        }
        return self._post_africastalking("/webhooks/africastalking/inbound", params, token, url)

    def africastalking_opt_out(
        self, phone: str, *, sender_id: str = "ACME", token: Any = _UNSET, url: str | None = None
    ) -> CallbackResult:
        """Africa's Talking's bulk-SMS opt-out notification (the subscriber opted out of the sender id): a
        form POST of senderId and phoneNumber to {callback_base_url}/webhooks/africastalking/opt-out?token=."""
        params = {"senderId": sender_id, "phoneNumber": phone}
        return self._post_africastalking("/webhooks/africastalking/opt-out", params, token, url)

    def _post_africastalking(self, path: str, params: dict[str, str], token: Any, url: str | None) -> CallbackResult:
        token = self.webhook_token if token is _UNSET else token
        if url is None:
            url = self._callback_url(path)
            if token is not None:
                url += "?" + urlencode({"token": token})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self._post("africastalking", url, urlencode(params).encode(), headers)

    def twilio_inbound(
        self,
        from_: str,
        body: str,
        *,
        to: str | None = None,
        sign: bool = True,
        auth_token: str | None = None,
        url: str | None = None,
    ) -> CallbackResult:
        """An SMS a customer sent to the Twilio number, as Twilio's incoming-message webhook posts it: a form
        POST of MessageSid, SmsSid, SmsMessageSid, AccountSid, From, To, Body, NumMedia, NumSegments and
        ApiVersion to {callback_base_url}/webhooks/twilio/inbound, signed in X-Twilio-Signature over the
        exact URL like its status callbacks (`sign=False`: unsigned; `auth_token`: another secret)."""
        sid = "SM" + secrets.token_hex(16)
        params = {
            "AccountSid": self.twilio_account_sid,
            "ApiVersion": "2010-04-01",
            "Body": body,
            "From": from_,
            "MessageSid": sid,
            "NumMedia": "0",
            "NumSegments": "1",
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "SmsStatus": "received",
            "To": to or self.twilio_service_from,
        }
        url = url or self._callback_url("/webhooks/twilio/inbound")
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "TwilioProxy/1.1"}
        if sign:
            headers["X-Twilio-Signature"] = RequestValidator(auth_token or self.twilio_auth_token).compute_signature(
                url, params
            )
        return self._post("twilio", url, urlencode(params).encode(), headers)

    def whatsapp_inbound(
        self,
        messages: Iterable[tuple[str, str]],
        *,
        statuses: Iterable[tuple[str, str]] = (),
        sign: bool = True,
        app_secret: str | None = None,
        url: str | None = None,
    ) -> CallbackResult:
        """Meta's messages webhook carrying text messages customers sent, `(wa_id, text)` (`wa_id`: the number
        without `+`), with their `contacts`, and `statuses` of sent messages `(wamid, status)` in the same post
        when given; signed as `whatsapp_receipt`."""
        messages = list(messages)
        inbound = [
            {
                "from": wa_id,
                "id": "wamid." + secrets.token_hex(24),
                "timestamp": str(int(time.time())),
                "type": "text",
                "text": {"body": text},
            }
            for wa_id, text in messages
        ]
        contacts = [{"profile": {"name": "Customer"}, "wa_id": wa_id} for wa_id, _ in messages]
        receipts = [self._whatsapp_status(wamid, status) for wamid, status in statuses]
        extra = {"contacts": contacts, "messages": inbound} if inbound else {}
        return self._post_whatsapp(receipts, sign, app_secret, url, extra)

    def _whatsapp_status(
        self, wamid: str, status: str, errors: list[int | dict] | None = None, recipient_id: str | None = None
    ) -> dict[str, Any]:
        sent = self._message("whatsapp", wamid)
        recipient_id = recipient_id or sent.get("recipient_id")
        if recipient_id is None:
            raise ValueError(f"unknown WhatsApp message {wamid}: pass recipient_id=")
        entry: dict[str, Any] = {
            "id": wamid,
            "status": status,
            "timestamp": str(int(time.time())),
            "recipient_id": recipient_id,
        }
        if status == "failed":
            errors = [131026] if errors is None else errors
        if errors:
            entry["errors"] = [_whatsapp_error_object(e) if isinstance(e, int) else e for e in errors]
        if status in ("sent", "delivered", "read"):
            category = sent.get("category", "marketing")
            entry["conversation"] = {"id": secrets.token_hex(16), "origin": {"type": category}}
            entry["pricing"] = {"billable": True, "pricing_model": "CBP", "category": category}
        return entry

    def _post_whatsapp(
        self,
        statuses: list[dict[str, Any]],
        sign: bool = True,
        app_secret: str | None = None,
        url: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> CallbackResult:
        value: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": self.whatsapp_display_phone_number,
                "phone_number_id": self.whatsapp_phone_number_id,
            },
            **(extra or {}),
        }
        if statuses or not extra:
            value["statuses"] = statuses
        envelope = {
            "object": "whatsapp_business_account",
            "entry": [{"id": self.whatsapp_business_account_id, "changes": [{"value": value, "field": "messages"}]}],
        }
        raw = json.dumps(envelope, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "facebookexternalua"}
        if sign:
            digest = hmac.new((app_secret or self.whatsapp_app_secret).encode(), raw, hashlib.sha256).hexdigest()
            headers["X-Hub-Signature-256"] = f"sha256={digest}"
        return self._post("whatsapp", url or self._callback_url("/webhooks/whatsapp"), raw, headers)

    def _callback_url(self, path: str) -> str:
        if not self.callback_base_url:
            raise ValueError("set fake.callback_base_url to the service's base URL first")
        return self.callback_base_url.rstrip("/") + path

    def _post(
        self, provider: str, url: str, body: bytes, headers: dict[str, str], method: str = "POST"
    ) -> CallbackResult:
        """Send one callback and record it with the service's answer; a connection failure is recorded, then
        raised."""
        result = CallbackResult(provider, method, url, dict(headers), body)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.netloc, timeout=self.callback_timeout)
        try:
            connection.request(method, target, body=body if method == "POST" else None, headers=headers)
            response = connection.getresponse()
            result.status = response.status
            result.body = response.read().decode("utf-8", "replace")
            result.headers = {name.lower(): value for name, value in response.getheaders()}
        except OSError as error:
            result.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            connection.close()
            with self._lock:
                self._callbacks.append(result)
        return result


def _read_body(handler: _Handler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _parse(raw: bytes, content_type: str) -> Any:
    """The form as one value per name (the last, for repeated names), or the JSON body (None if malformed)."""
    if content_type.startswith("application/json"):
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return None
    return {name: values[-1] for name, values in parse_qs(raw.decode("utf-8", "replace"), True).items()}


def _write(handler: _Handler, reply: _Reply) -> None:
    handler.send_response(reply.status)
    handler.send_header("Content-Type", reply.content_type)
    handler.send_header("Content-Length", str(len(reply.body)))
    for name, value in reply.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(reply.body)
    handler.wfile.flush()


def _answer(reply: _Reply) -> Any:
    text = reply.body.decode("utf-8", "replace")
    if reply.content_type.startswith("application/json"):
        return json.loads(text)
    return text


def _json(
    status: int,
    body: Any,
    *,
    message_ids: list[str] | None = None,
    headers: dict[str, str] | None = None,
    outcome: str = "accept",
    content_type: str = "application/json",
) -> _Reply:
    return _Reply(status, json.dumps(body).encode(), content_type, headers or {}, message_ids or [], outcome)


def _text(status: int, text: str, headers: dict[str, str] | None = None, *, outcome: str) -> _Reply:
    return _Reply(status, text.encode(), "text/plain; charset=utf-8", headers or {}, [], outcome)


def _retry(outcome: Outcome) -> dict[str, str]:
    return {} if outcome.retry_after is None else {"Retry-After": str(outcome.retry_after)}


def _kind(ids: list[str], refused: list[int]) -> str:
    return "refuse" if refused and not ids else "accept"


def _at_xml(answer: dict[str, Any]) -> bytes:
    """The XML Africa's Talking answers a client that did not ask for JSON (so that such a client fails)."""
    data = answer["SMSMessageData"]
    recipients = "".join(
        "<Recipient>" + "".join(f"<{k}>{v}</{k}>" for k, v in r.items()) + "</Recipient>" for r in data["Recipients"]
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><AfricasTalkingResponse><SMSMessageData>'
        f"<Message>{data['Message']}</Message><Recipients>{recipients}</Recipients>"
        "</SMSMessageData></AfricasTalkingResponse>"
    ).encode()


def _basic_auth(header: str) -> tuple[str | None, str | None]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None, None
    try:
        user, _, token = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return None, None
    return user, token


def _fbtrace() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(15)).decode()


def _wamid(wa_id: str) -> str:
    """A message id shaped as Meta's: wamid. + base64 of the recipient and a random hex id."""
    raw = b"\x1c\x18" + bytes([len(wa_id)]) + wa_id.encode() + b"\x15\x02\x00\x12\x18\x14"
    return "wamid." + base64.b64encode(raw + secrets.token_hex(10).upper().encode() + b"\x00").decode()


def _whatsapp_error_object(code: int) -> dict[str, Any]:
    title = WHATSAPP_TITLES.get(code, f"Error {code}")
    return {
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": title},
        "href": WHATSAPP_ERRORS_HREF,
    }


def _whatsapp_error(
    status: int, code: int, details: str, headers: dict[str, str] | None = None, *, outcome: str
) -> _Reply:
    error = {
        "message": f"(#{code}) {WHATSAPP_TITLES.get(code, 'Error')}",
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details},
        "fbtrace_id": _fbtrace(),
    }
    return _json(
        status, {"error": error}, headers=headers, outcome=outcome, content_type="application/json; charset=UTF-8"
    )


def _whatsapp_problem(body: Any) -> str | None:
    """What is wrong with a send-message body, as Meta's error details would name it; None if it is valid."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if body.get("messaging_product") != "whatsapp":
        return "The parameter messaging_product is required and must be 'whatsapp'."
    if body.get("recipient_type", "individual") not in ("individual", "group"):
        return "Param recipient_type must be 'individual'."
    to = body.get("to")
    # Meta accepts '+', hyphens, parentheses and spaces in `to`, and recommends the '+'.
    if not isinstance(to, str) or not re.fullmatch(r"\+?[\d\s()\-]+", to) or not 7 <= len(_digits(to)) <= 15:
        return "The parameter to is required and must be a phone number with its country calling code."
    kind = body.get("type", "text")
    if kind == "text":
        text = body.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str) or not text["body"]:
            return "Param text['body'] is required."
        if len(text["body"]) > 4096:
            return "Param text['body'] must be at most 4096 characters long."
        return None
    if kind == "template":
        return _template_problem(body.get("template"))
    if kind in ("image", "audio", "video", "document", "sticker", "location", "contacts", "interactive", "reaction"):
        return None if isinstance(body.get(kind), dict) else f"Param {kind} is required."
    return f"Param type must be one of the supported message types, not {kind!r}."


def _template_problem(template: Any) -> str | None:
    if not isinstance(template, dict):
        return "Param template is required."
    if not isinstance(template.get("name"), str) or not template["name"]:
        return "Param template['name'] is required."
    language = template.get("language")
    if not isinstance(language, dict) or not isinstance(language.get("code"), str) or not language["code"]:
        return "Param template['language']['code'] is required."
    components = template.get("components", [])
    if not isinstance(components, list):
        return "Param template['components'] must be an array."
    for i, component in enumerate(components):
        if not isinstance(component, dict) or component.get("type") not in ("header", "body", "button", "footer"):
            return f"Param template['components'][{i}]['type'] is invalid."
        parameters = component.get("parameters", [])
        if not isinstance(parameters, list):
            return f"Param template['components'][{i}]['parameters'] must be an array."
        for j, parameter in enumerate(parameters):
            where = f"template['components'][{i}]['parameters'][{j}]"
            if not isinstance(parameter, dict) or not isinstance(parameter.get("type"), str):
                return f"Param {where}['type'] is required."
            if parameter["type"] == "text" and not isinstance(parameter.get("text"), str):
                return f"Param {where}['text'] is required."
    return None
