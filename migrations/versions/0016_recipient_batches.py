"""recipient batches: a send to a large audience adds its recipients in batches after its answer; the
campaign keeps the audience being added, how far it has come and the send's counts

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 21:30:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("adding_audience", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("adding_after", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("adding_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_send", sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("last_send")
        batch.drop_column("adding_at")
        batch.drop_column("adding_after")
        batch.drop_column("adding_audience")
