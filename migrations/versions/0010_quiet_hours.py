"""quiet hours: a campaign's respect_quiet_hours, a message's not_before, and the index stats count them by

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 16:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_WAITING = "status = 'pending' AND not_before IS NOT NULL"


def upgrade():
    # A constant default and a nullable column: on PostgreSQL both are metadata-only changes, however
    # many rows there are. Existing campaigns respect quiet hours, as new ones do by default.
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("respect_quiet_hours", sa.Boolean(), server_default=sa.text("true"), nullable=False)
        )
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
    # Partial: only messages waiting out quiet hours are in it, so it stays small and costs the sends
    # nothing. Building it reads the table once (writes to it wait meanwhile).
    op.create_index(
        "ix_outbound_messages_waiting",
        "outbound_messages",
        ["campaign_id", "not_before"],
        unique=False,
        postgresql_where=sa.text(_WAITING),
        sqlite_where=sa.text(_WAITING),
    )


def downgrade():
    op.drop_index(
        "ix_outbound_messages_waiting",
        table_name="outbound_messages",
        postgresql_where=sa.text(_WAITING),
        sqlite_where=sa.text(_WAITING),
    )
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_column("not_before")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("respect_quiet_hours")
