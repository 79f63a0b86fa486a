"""opt-outs: a customer's opt-out per channel (sms, whatsapp), with when and where it came from

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 15:00:00.000000

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0009"
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "customer_opt_outs",
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("customer_id", "channel"),
    )


def downgrade():
    op.drop_table("customer_opt_outs")
