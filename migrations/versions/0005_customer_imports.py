"""customer imports run as a job, and the chunks of their uploads

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('customer_imports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('bytes_total', sa.BigInteger(), nullable=False),
    sa.Column('bytes_done', sa.BigInteger(), nullable=False),
    sa.Column('lines_done', sa.BigInteger(), nullable=False),
    sa.Column('created_count', sa.Integer(), nullable=False),
    sa.Column('updated_count', sa.Integer(), nullable=False),
    sa.Column('invalid_count', sa.Integer(), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('errors_truncated', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('customer_imports', schema=None) as batch_op:
        batch_op.create_index('ix_customer_imports_status_updated_at', ['status', 'updated_at'], unique=False)

    op.create_table('customer_import_chunks',
    sa.Column('import_id', sa.Integer(), nullable=False),
    sa.Column('start', sa.BigInteger(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['import_id'], ['customer_imports.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('import_id', 'start')
    )


def downgrade():
    op.drop_table('customer_import_chunks')
    with op.batch_alter_table('customer_imports', schema=None) as batch_op:
        batch_op.drop_index('ix_customer_imports_status_updated_at')

    op.drop_table('customer_imports')
