"""One pagination helper for every list endpoint."""

from __future__ import annotations

from sqlalchemy import Select, func, select

from app.extensions import db


def paginate(stmt: Select, page: int, page_size: int) -> dict:
    """Run `stmt` (already filtered and ordered) for one page; returns the response envelope."""
    total = db.session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = db.session.scalars(stmt.limit(page_size).offset((page - 1) * page_size)).all()
    return {
        "data": rows,
        "pagination": {
            "page": page,
            "page_size": page_size,
            "total": total,
            "total_pages": -(-total // page_size),
        },
    }
