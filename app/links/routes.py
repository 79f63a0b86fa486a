"""`GET /l/{code}`: a short link's redirect. Public (no API key, no rate limit): the one endpoint the
service's recipients reach."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from app import clock, metrics
from app.links import clicks
from app.links.codes import codec

bp = Blueprint("links", __name__)

NOT_FOUND = "This link does not exist.\n"


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/l/<code>", methods=["GET", "HEAD"])
def follow(code: str) -> Response:
    """302 to the link's original URL, counting a click when a person asked for it: not for HEAD, and not
    for a link-preview fetcher. 404 (a short plain page) for a code that names no link."""
    named = codec(current_app).decode(code)
    url = None
    if named is not None:
        if request.method == "HEAD":
            result = "head"
        elif clicks.is_preview(request.user_agent.string):
            result = "preview"
        else:
            result = "click"
        url = clicks.click(*named, clock.now()) if result == "click" else clicks.find(*named)
    if url is None:
        metrics.count_link_request("unknown")
        return _no_store(Response(NOT_FOUND, status=404, mimetype="text/plain"))
    metrics.count_link_request(result)
    return _no_store(Response(status=302, headers={"Location": url}))
