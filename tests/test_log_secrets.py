"""No secret in any log line, whatever writes it: Africa's Talking's callbacks carry WEBHOOK_TOKEN as
`?token=`, Meta's webhook check carries WHATSAPP_VERIFY_TOKEN as `hub.verify_token`, and gunicorn's access
log, gunicorn's own lines, werkzeug's and the service's JSON lines all see the URL. The processes run as
the Procfile (and `flask run`) start them; every byte they write is searched for the secrets."""

from __future__ import annotations

import socket
import time
from urllib.parse import quote_plus, unquote, unquote_plus, urlencode, urlsplit

import httpx
import pytest

from app.logs import REDACTED, redact
from tests.conftest import wait_for_port
from tests.helpers import free_port

# Secrets as an operator might write them: characters a URL must escape included.
WEBHOOK_TOKEN = "at+callback/token=Z9q 7"
VERIFY_TOKEN = "meta-verify-token-4f1d"
APP_SECRET = "meta-app-secret-a8b3c2"
TWILIO_TOKEN = "twilio-auth-token-77e1"
SECRETS = {
    "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
    "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
    "WHATSAPP_APP_SECRET": APP_SECRET,
    "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
}


def leaks(output: str) -> list[str]:
    """The secrets `output` holds: as they are, or escaped as a URL escapes them (however it does)."""
    decoded = [output, unquote(output), unquote_plus(output)]
    return sorted(name for name, secret in SECRETS.items() if any(secret in text for text in decoded))


def callbacks(base_url: str) -> None:
    """Every request that carries a secret in its URL: accepted, refused, and sent where nothing listens."""
    token = urlencode({"token": WEBHOOK_TOKEN})
    with httpx.Client(base_url=base_url, timeout=10) as http:
        receipt = {"id": "ATXid_1", "status": "Success", "phoneNumber": "+254711000001"}
        assert http.post(f"/webhooks/africastalking/delivery?{token}", data=receipt).status_code == 200
        inbound = {"from": "+254711000001", "text": "STOP", "to": "12345"}
        assert http.post(f"/webhooks/africastalking/inbound?{token}", data=inbound).status_code == 200
        assert http.post(f"/webhooks/africastalking/opt-out?{token}&x=1", data={"phoneNumber": "x"}).status_code == 200
        verify = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
        assert http.get("/webhooks/whatsapp", params=verify).text == "1158201444"
        refused = {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"}
        assert http.get("/webhooks/whatsapp", params=refused).status_code == 403
        assert http.post("/webhooks/twilio/status?" + urlencode({"t": TWILIO_TOKEN})).status_code == 403
        assert http.get("/nowhere", params={"token": WEBHOOK_TOKEN, "s": APP_SECRET}).status_code in (401, 404)
        referer = {"Referer": f"https://example.com/?token={quote_plus(WEBHOOK_TOKEN)}"}
        assert http.get("/health", headers=referer).status_code in (200, 503)
    # A request line gunicorn cannot parse: it says so in its own log, the line quoted.
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(f"GET /webhooks/whatsapp?{token}\r\nHost: x\r\n\r\n".encode())
        sock.recv(4096)


def output_of(proc, lines_at_least: int) -> str:
    """Everything `proc` wrote to stdout and stderr, once its access log has caught up."""
    deadline = time.monotonic() + 10
    while True:
        proc.stdout.seek(0)
        proc.stderr.seek(0)
        output = proc.stdout.read().decode() + proc.stderr.read().decode()
        if output.count("\n") >= lines_at_least or time.monotonic() > deadline:
            return output
        time.sleep(0.1)


@pytest.mark.real_only
@pytest.mark.parametrize(
    "access_log_format",
    [None, "%(h)s %(r)s %(s)s q=%(q)s uri=%({raw_uri}e)s qs=%({query_string}e)s ref=%(f)s"],
    ids=["procfile", "every-url-atom"],
)
def test_the_procfile_web_process_writes_no_secret(app, spawn_web_process, access_log_format):
    args = "--log-level debug" + (f" --access-logformat '{access_log_format}'" if access_log_format else "")
    proc, base_url = spawn_web_process(WEB_CONCURRENCY=1, LOG_LEVEL="DEBUG", GUNICORN_CMD_ARGS=args, **SECRETS)
    callbacks(base_url)
    output = output_of(proc, lines_at_least=9)
    assert leaks(output) == [], output[-3000:]
    assert output.count(f"token={REDACTED}") >= 4, output[-3000:]  # the lines are there, redacted
    assert f"hub.verify_token={REDACTED}" in output
    assert f"Invalid HTTP request line: 'GET /webhooks/whatsapp?token={REDACTED}'" in output  # gunicorn's own


@pytest.mark.real_only
def test_the_development_server_writes_no_secret(app, spawn):
    port = free_port()
    proc = spawn(["-m", "flask", "--app", "wsgi", "run", "--port", str(port)], LOG_LEVEL="DEBUG", **SECRETS)
    base_url = wait_for_port(proc, port)
    callbacks(base_url)
    output = output_of(proc, lines_at_least=9)
    assert leaks(output) == [], output[-3000:]
    assert f"token={REDACTED}" in output  # werkzeug's request lines, as JSON lines


SHORT, LONG = "abc", "long-enough-secret"  # a secret under 8 characters is redacted only as a query value


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"POST /at/delivery?token=s3cr3t HTTP/1.1" 200', '"POST /at/delivery?token=[redacted] HTTP/1.1" 200'),
        (
            "/whatsapp?hub.mode=subscribe&hub.verify_token=x&a=1",
            "/whatsapp?hub.mode=subscribe&hub.verify_token=[redacted]&a=1",
        ),
        ("/x?hub%2Everify_token=x", "/x?hub%2Everify_token=[redacted]"),
        ("/x?TOKEN=x#top", "/x?TOKEN=[redacted]"),
        ("q=token=x&page=2", "q=token=[redacted]&page=2"),  # gunicorn's %(q)s after a label
        ("ref=https://example.com/?token=x", "ref=https://example.com/?token=[redacted]"),
        ("/x?t=abc", "/x?t=[redacted]"),  # a secret's value, under any name
        ("/x?t=long-enough-secret&u=1", "/x?t=[redacted]&u=1"),
        ("/x?t=a%2Bb%20c", "/x?t=[redacted]"),  # decoded as a query is
        ("/x?t=a%2Bb+c", "/x?t=[redacted]"),
        ("the key: long-enough-secret, again", "the key: [redacted], again"),  # anywhere, when long enough
        ("abc is short: found only as a query value", "abc is short: found only as a query value"),
        ("/x?page=2&tokens=3&abc=4", "/x?page=2&tokens=3&abc=4"),
        ("a=b c=d", "a=b c=d"),
    ],
)
def test_a_line_is_written_without_its_secrets(line, expected):
    assert redact(line, [SHORT, LONG, "a+b c"]) == expected.replace("[redacted]", REDACTED)
