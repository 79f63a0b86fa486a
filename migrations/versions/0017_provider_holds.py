"""provider holds: when a provider held a message back to try later (WhatsApp 131049), once

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 22:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("outbound_messages") as batch:
        batch.add_column(sa.Column("provider_held_at", sa.DateTime(timezone=True), nullable=True))


def downgrade():
    with op.batch_alter_table("outbound_messages") as batch:
        batch.drop_column("provider_held_at")
