"""audiences: customers' attributes and country (backfilled from their phones); messages' sent_at and
delivered_at

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 16:00:00.000000

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.customers.phones import country_of

# revision identifiers, used by Alembic.
revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_BACKFILL_BATCH = 10_000


def _backfill_countries() -> None:
    """Each customer's country from their phone, in batches by id (libphonenumber runs in Python)."""
    bind = op.get_bind()
    customers = sa.table("customers", sa.column("id", sa.Integer), sa.column("phone"), sa.column("country"))
    last = 0
    while True:
        rows = bind.execute(
            sa.select(customers.c.id, customers.c.phone)
            .where(customers.c.id > last)
            .order_by(customers.c.id)
            .limit(_BACKFILL_BATCH)
        ).all()
        if not rows:
            return
        updates = [{"cid": row.id, "value": country_of(row.phone)} for row in rows]
        updates = [u for u in updates if u["value"] is not None]
        if updates:
            bind.execute(
                customers.update().where(customers.c.id == sa.bindparam("cid")).values(country=sa.bindparam("value")),
                updates,
            )
        last = rows[-1].id


def upgrade():
    json_object = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        # A constant default: a metadata-only change on PostgreSQL, however many rows.
        batch_op.add_column(sa.Column("attributes", json_object, server_default=sa.text("'{}'"), nullable=False))
        batch_op.add_column(sa.Column("country", sa.String(length=2), nullable=True))
    _backfill_countries()
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))


def downgrade():
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("sent_at")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_column("country")
        batch_op.drop_column("attributes")
