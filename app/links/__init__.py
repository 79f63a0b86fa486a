"""Short links that count clicks: codes (`codes`), shortening a message's URLs (`shorten`), the redirect
in front of the app (`redirect`) and what clicks add up to (`clicks`)."""

from app.links.redirect import install

__all__ = ["install"]
