"""customers.phone: 32 characters instead of 16

libphonenumber validates numbers longer than E.164's 15 digits (`+49335199080462505`); a 16-character
column refused them with an error.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 09:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.alter_column('phone', existing_type=sa.String(length=16), type_=sa.String(length=32),
                              existing_nullable=False)


def downgrade():
    # Numbers over 16 characters do not fit the old column: a downgrade with such rows fails, as it should.
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.alter_column('phone', existing_type=sa.String(length=32), type_=sa.String(length=16),
                              existing_nullable=False)
