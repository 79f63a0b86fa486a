"""Request bodies: over the limit is a 413, never a truncated body, whatever the transfer encoding.

A chunked body has no `Content-Length`; gunicorn (like werkzeug's server) sets `wsgi.input_terminated`,
and werkzeug then reads it through a `LimitedStream` capped at `max_content_length`. That stream's
`readall()` (what `request.get_data()` and `request.stream.read()` use) stops at the cap and returns the
first `max_content_length` bytes as if they were the whole body (a 6 MB JSON body was parsed from its
first 5 MB), and any other read at the cap raises 413 even when the body ends there. `Request` reads one
byte past the cap instead: 413 when there is one, the end of the body when there is none.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import IO

from flask import Request as FlaskRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream, get_input_stream

COPY_BUFFER = 1024 * 1024


class CappedStream(LimitedStream):
    """A `LimitedStream` at a maximum that refuses, rather than cuts, a body longer than the maximum,
    and takes a body of exactly the maximum."""

    def on_exhausted(self) -> None:
        # At the cap: the body either ends here or is too long.
        if self._stream.read(1):
            raise RequestEntityTooLarge()

    def readall(self) -> bytes:
        data = super().readall()
        if self.is_exhausted:
            self.on_exhausted()
        return data


class Request(FlaskRequest):
    """The app's request: its `stream` raises 413 for a body over `max_content_length` however it is read."""

    @cached_property
    def stream(self) -> IO[bytes]:
        stream = get_input_stream(self.environ, max_content_length=self.max_content_length)
        if isinstance(stream, LimitedStream) and "wsgi.input_terminated" in self.environ:
            # werkzeug capped a server-terminated stream at max_content_length: cap it without cutting.
            return CappedStream(self.environ["wsgi.input"], stream.limit, is_max=True)
        return stream


def spool(stream: IO[bytes]) -> IO[bytes]:
    """The whole of `stream` in a temporary file, read from its start; a body over the request's limit
    raises 413 while it is read, before the caller has done anything with it."""
    spooled = tempfile.TemporaryFile()
    try:
        shutil.copyfileobj(stream, spooled, COPY_BUFFER)
    except BaseException:
        spooled.close()
        raise
    spooled.seek(0)
    return spooled
