"""audiences: customers' attributes and country (backfilled from their phones); messages' sent_at and
delivered_at; saved segments; a campaign's waiting segment and ignore_frequency_cap

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
_SENT = "sent_at IS NOT NULL"


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
    # Empty at first: no message has a sent_at until this code records one.
    op.create_index(
        "ix_outbound_messages_customer_sent_at",
        "outbound_messages",
        ["customer_id", "sent_at"],
        unique=False,
        postgresql_where=sa.text(_SENT),
        sqlite_where=sa.text(_SENT),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("filter", json_object, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ignore_frequency_cap", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )
        batch_op.add_column(sa.Column("segment_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_campaigns_segment_id_segments", "segments", ["segment_id"], ["id"], ondelete="SET NULL"
        )


def downgrade():
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_constraint("fk_campaigns_segment_id_segments", type_="foreignkey")
        batch_op.drop_column("segment_id")
        batch_op.drop_column("ignore_frequency_cap")
    op.drop_table("segments")
    op.drop_index("ix_outbound_messages_customer_sent_at", table_name="outbound_messages")
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("sent_at")
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.drop_column("country")
        batch_op.drop_column("attributes")
