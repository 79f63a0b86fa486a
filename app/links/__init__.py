"""Short links that count clicks: codes (`codes`), shortening a message's URLs (`shorten`), the redirect
(`routes`) and what clicks add up to (`clicks`)."""

from app.links.routes import bp

__all__ = ["bp"]
