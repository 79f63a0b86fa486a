"""campaign controls: a kept delivery receipt's error class (retry-failed sends again only transient failures)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('delivery_receipts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error_class', sa.String(length=16), nullable=True))


def downgrade():
    with op.batch_alter_table('delivery_receipts', schema=None) as batch_op:
        batch_op.drop_column('error_class')
