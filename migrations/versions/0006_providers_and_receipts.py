"""providers: who took each message and its id, error codes, read time; WhatsApp templates; receipts waiting for their message

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('outbound_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error_code', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('error_class', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('provider', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('provider_message_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('read_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            'uq_outbound_messages_provider_message_id',
            ['provider', 'provider_message_id'],
            unique=True,
            postgresql_where=sa.text('provider_message_id IS NOT NULL'),
            sqlite_where=sa.text('provider_message_id IS NOT NULL'),
        )

    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('whatsapp_template', sa.JSON(), nullable=True))

    op.create_table('delivery_receipts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=False),
    sa.Column('provider_message_id', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('read', sa.Boolean(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('delivery_receipts', schema=None) as batch_op:
        batch_op.create_index('ix_delivery_receipts_provider_message_id', ['provider', 'provider_message_id'], unique=False)


def downgrade():
    with op.batch_alter_table('delivery_receipts', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_receipts_provider_message_id')
    op.drop_table('delivery_receipts')

    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.drop_column('whatsapp_template')

    with op.batch_alter_table('outbound_messages', schema=None) as batch_op:
        batch_op.drop_index('uq_outbound_messages_provider_message_id')
        batch_op.drop_column('read_at')
        batch_op.drop_column('provider_message_id')
        batch_op.drop_column('provider')
        batch_op.drop_column('error_class')
        batch_op.drop_column('error_code')
