"""Shortening: each http(s) URL in a message's text becomes `{LINK_BASE_URL}/{code}`, a code of its own for
the message and the link (`codes`). The original URLs are kept with the message, in order (their position is
in the code), and the redirect sends a click to the one its code names.

A URL is `http://` or `https://` followed by characters up to the next space, quote or angle bracket, less
trailing punctuation that ends a sentence (`.,;:!?`) and a closing bracket it does not open (so `(see
https://x.co/a)` keeps its bracket outside the link). The same URL twice in one message is one link, one code.
URLs already under LINK_BASE_URL are left as they are, and so is any past the 16th link.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from flask import Flask

from app.links.codes import LENGTH, MAX_LINKS, codec

_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)
_TRAILING = ".,;:!?"
_PAIRS = {")": "(", "]": "[", "}": "{"}
# What the preview and the estimate show where a message's code will be: the same length as any code.
SAMPLE_CODE = "x" * LENGTH


def link_base(config) -> str:
    """Where short links point: LINK_BASE_URL, else PUBLIC_BASE_URL + `/l`, else this machine on PORT (a
    local run; a deploy sets one of the first two)."""
    if config.get("LINK_BASE_URL"):
        return config["LINK_BASE_URL"]
    if config.get("PUBLIC_BASE_URL"):
        return f"{config['PUBLIC_BASE_URL']}/l"
    return f"http://127.0.0.1:{config.get('PORT', 5000)}/l"


def _trimmed(url: str) -> str:
    """`url` less the punctuation a sentence puts after it, and closing brackets it does not open."""
    while url:
        last = url[-1]
        if last in _TRAILING:
            url = url[:-1]
        elif last in _PAIRS and url.count(last) > url.count(_PAIRS[last]):
            url = url[:-1]
        else:
            break
    return url


def has_link(text: str) -> bool:
    """Whether `text` may hold a URL (a cheap test before the regex)."""
    return "://" in text


class Shortener:
    """Shortens the texts of one message (its body and, for WhatsApp, its template's parameters), numbering
    its links across them: `links` lists the original URLs by position."""

    def __init__(self, base: str, code_for: Callable[[int], str]) -> None:
        self._base = base
        self._code_for = code_for
        self._positions: dict[str, int] = {}
        self.links: list[str] = []

    def shorten(self, text: str) -> str:
        if not has_link(text):
            return text
        return _URL.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        found = match.group(0)
        url = _trimmed(found)
        rest = found[len(url) :]
        if not url.partition("://")[2] or url.startswith(self._base + "/"):
            return found
        position = self._positions.get(url)
        if position is None:
            if len(self.links) >= MAX_LINKS:
                return found
            position = self._positions[url] = len(self.links)
            self.links.append(url)
        return f"{self._base}/{self._code_for(position)}{rest}"


def for_message(app: Flask, message_id: int) -> Shortener:
    """The shortener of message `message_id`: its real codes."""
    encode = codec(app).encode
    return Shortener(link_base(app.config), lambda position: encode(message_id, position))


def sample(app: Flask) -> Shortener:
    """A shortener for the preview and the estimate: every code is `SAMPLE_CODE` (the length of a real one, so
    the characters and segments counted are what the messages will carry)."""
    return Shortener(link_base(app.config), lambda position: SAMPLE_CODE)
