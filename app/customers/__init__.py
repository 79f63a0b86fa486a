from app.customers.routes import bp

__all__ = ["bp"]
