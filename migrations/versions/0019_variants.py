"""variants: a campaign's A/B variants, the variant of each message; the kept counts per variant

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08 01:00:00.000000

"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

# The key a message is counted under (`app.messaging.stats.KEY`): its status; `v:<variant>:<status>` for a
# message of a variant; for an SMS fallback `f:` and its status, or `f:opted_out` / `f:frequency_cap` for one
# skipped for that reason.
KEY = (
    "CASE WHEN fallback_for IS NULL AND variant IS NULL THEN status"
    " WHEN fallback_for IS NULL THEN 'v:' || variant || ':' || status"
    " WHEN status = 'canceled' AND error_code IN ('opted_out', 'frequency_cap') THEN 'f:' || error_code"
    " ELSE 'f:' || status END"
)


def _migration(name: str):
    spec = importlib.util.spec_from_file_location("earlier_migration", Path(__file__).with_name(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade():
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("variants", sa.JSON(), nullable=True))
    with op.batch_alter_table("outbound_messages") as batch:
        batch.add_column(sa.Column("variant", sa.String(length=40), nullable=True))
    for table in ("campaign_message_counts", "campaign_message_count_changes"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("status", type_=sa.String(length=64), existing_type=sa.String(length=16))
    if op.get_context().dialect.name == "postgresql":
        previous = _migration("0018_sms_fallback.py")
        op.execute(previous.CAPTURE.replace(previous.KEY, KEY))


def downgrade():
    if op.get_context().dialect.name == "postgresql":
        op.execute(_migration("0018_sms_fallback.py").CAPTURE)
        # A variant's counts go back under their plain status (the fold adds them up).
        op.execute(
            "UPDATE campaign_message_count_changes SET status = split_part(status, ':', 3) WHERE status LIKE 'v:%'"
        )
        op.execute(
            "INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)"
            " SELECT campaign_id, split_part(status, ':', 3), messages, read, segments, clicked, clicks"
            " FROM campaign_message_counts WHERE status LIKE 'v:%'"
        )
        op.execute("DELETE FROM campaign_message_counts WHERE status LIKE 'v:%'")
    for table in ("campaign_message_counts", "campaign_message_count_changes"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("status", type_=sa.String(length=16), existing_type=sa.String(length=64))
    # SQLite's batch mode copies the table to drop a column, and would lose the expression index of 0018
    # (and the condition of its partial one): they are made again after.
    sqlite = op.get_context().dialect.name == "sqlite"
    indexes = ("uq_outbound_messages_customer_campaign_fallback", "uq_outbound_messages_fallback_for")
    if sqlite:
        for index in indexes:
            op.drop_index(index, table_name="outbound_messages")
    with op.batch_alter_table("outbound_messages") as batch:
        batch.drop_column("variant")
    if sqlite:
        _migration("0018_sms_fallback.py").create_indexes()
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("variants")
