"""send claims and windows: a message is queued (its job in Redis) and then claimed (sending, with a lease)
before its provider call; a campaign's priority weighs its window

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 13:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_READY = "status = 'pending' AND not_before IS NULL"
_LEASES = "status = 'sending'"


def upgrade():
    # Nullable columns and constant defaults: metadata-only changes on PostgreSQL, however many rows.
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_seq", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("claim_token", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.String(length=8), server_default="normal", nullable=False))
    # Both partial: the first holds the messages a window refill may take next, the second only the
    # messages being sent right now. Building them reads the table once.
    op.create_index(
        "ix_outbound_messages_ready",
        "outbound_messages",
        ["campaign_id", "id"],
        unique=False,
        postgresql_where=sa.text(_READY),
        sqlite_where=sa.text(_READY),
    )
    op.create_index(
        "ix_outbound_messages_leases",
        "outbound_messages",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text(_LEASES),
        sqlite_where=sa.text(_LEASES),
    )


def downgrade():
    # The earlier code knows neither status: those messages wait in line again (its reconciler queues them).
    op.execute("UPDATE outbound_messages SET status = 'pending' WHERE status IN ('queued', 'sending')")
    op.drop_index("ix_outbound_messages_leases", table_name="outbound_messages")
    op.drop_index("ix_outbound_messages_ready", table_name="outbound_messages")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("priority")
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_column("claim_token")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("job_seq")
