from app.audiences.routes import bp

__all__ = ["bp"]
