from app.campaigns.routes import bp

__all__ = ["bp"]
