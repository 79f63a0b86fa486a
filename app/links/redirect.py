"""`GET /l/{code}`: a short link's redirect, answered in front of Flask.

It is the one public endpoint: every recipient who taps a link reaches it, all at once after a campaign
goes out. So it is served by a WSGI layer ahead of the Flask app (`ShortLinks`), which answers it with the
least work a click needs: decode the code (no database), then one statement that commits by itself: an
UPDATE by primary key that counts the click and returns the URL (`clicks.click`), or a SELECT of the URL
for what is not a click (HEAD, link-preview fetchers). No API key, no rate limit, no Flask request: what
the API's hooks do (keys, rate limits, request ids, per-route metrics) has nothing to do here.
`/metrics` counts these requests in `dispatch_link_requests_total{result}` instead.

Answers: 302 to the link's original URL (`Cache-Control: no-store`, an empty body); 404 with a short plain
page for a code that names no link (malformed, tampered with, or past the message's links), saying
nothing about other codes; 405 for other methods; 503 when the database cannot answer (the click is not
counted, and the person can tap again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flask import Flask
from werkzeug.urls import iri_to_uri

from app import clock, metrics
from app.database import is_unavailable
from app.links import clicks
from app.links.codes import codec

log = logging.getLogger(__name__)

PREFIX = "/l/"
NOT_FOUND = b"This link does not exist.\n"
UNAVAILABLE = b"This link cannot be followed right now; try again in a moment.\n"
_PLAIN = ("Content-Type", "text/plain; charset=utf-8")
_NO_STORE = ("Cache-Control", "no-store")


class ShortLinks:
    """WSGI middleware: answers `/l/{code}` itself and hands every other request to the app."""

    def __init__(self, app: Flask, inner: Callable) -> None:
        self._app = app
        self._inner = inner

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX):
            return self._inner(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"", [("Allow", "GET, HEAD"), _NO_STORE])
        try:
            status, body, headers = self._follow(path[len(PREFIX) :], method, environ.get("HTTP_USER_AGENT"))
        except Exception as exc:  # noqa: BLE001 - a short link never answers a 500 or a traceback
            if is_unavailable(exc):
                log.warning("the database cannot answer a short link", extra={"error": type(exc).__name__})
            else:
                log.exception("a short link's request failed")
            status, body, headers = "503 Service Unavailable", UNAVAILABLE, [_PLAIN, ("Retry-After", "5")]
        return _answer(start_response, status, b"" if method == "HEAD" else body, [*headers, _NO_STORE])

    def _follow(self, code: str, method: str, user_agent: str | None) -> tuple[str, bytes, list]:
        named = codec(self._app).decode(code)
        url = result = None
        if named is not None:
            if method == "HEAD":
                result = "head"
            elif clicks.is_preview(user_agent):
                result = "preview"
            else:
                result = "click"
            engine = clicks.engine_of(self._app)
            url = clicks.click(engine, *named, clock.now()) if result == "click" else clicks.find(engine, *named)
        recorder = metrics.recorder_of(self._app)
        if url is None:
            metrics.count_link_request("unknown", recorder)
            return "404 Not Found", NOT_FOUND, [_PLAIN]
        metrics.count_link_request(result, recorder)
        return "302 Found", b"", [("Location", url if url.isascii() else iri_to_uri(url))]


def _answer(start_response: Callable, status: str, body: bytes, headers: list) -> list[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def install(app: Flask) -> None:
    """Serve `/l/{code}` in front of `app`."""
    app.wsgi_app = ShortLinks(app, app.wsgi_app)
