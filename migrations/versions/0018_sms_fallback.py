"""sms fallback: a WhatsApp campaign's SMS fallback; a message may replace another (its fallback), one per
message; fallbacks counted apart in the kept campaign counts

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 00:10:00.000000

"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

# The key a message is counted under (`app.messaging.stats.count_key`): its status, or for a fallback `f:`
# and its status, and `f:opted_out` / `f:frequency_cap` for a fallback skipped for that reason.
KEY = (
    "CASE WHEN fallback_for IS NULL THEN status"
    " WHEN status = 'canceled' AND error_code IN ('opted_out', 'frequency_cap') THEN 'f:' || error_code"
    " ELSE 'f:' || status END"
)

CAPTURE = f"""
CREATE OR REPLACE FUNCTION campaign_message_counts_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, {KEY}, count(*), count(read_at), coalesce(sum(segments), 0),
               count(first_clicked_at), coalesce(sum(clicks), 0)
        FROM new_rows GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, {KEY}, -count(*), -count(read_at), -coalesce(sum(segments), 0),
               -count(first_clicked_at), -coalesce(sum(clicks), 0)
        FROM old_rows GROUP BY 1, 2;
    ELSE
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, status, sum(messages), sum(read), sum(segments), sum(clicked), sum(clicks)
        FROM (
            SELECT campaign_id, {KEY} AS status, 1 AS messages, (read_at IS NOT NULL)::int AS read,
                   coalesce(segments, 0) AS segments, (first_clicked_at IS NOT NULL)::int AS clicked,
                   clicks
            FROM new_rows
            UNION ALL
            SELECT campaign_id, {KEY}, -1, -(read_at IS NOT NULL)::int, -coalesce(segments, 0),
                   -(first_clicked_at IS NOT NULL)::int, -clicks
            FROM old_rows
        ) AS change
        GROUP BY campaign_id, status
        HAVING sum(messages) <> 0 OR sum(read) <> 0 OR sum(segments) <> 0 OR sum(clicked) <> 0
            OR sum(clicks) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""


def _capture_of(migration: str) -> str:
    """An earlier migration's trigger function (the downgrade puts it back)."""
    spec = importlib.util.spec_from_file_location("earlier_migration", Path(__file__).with_name(migration))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CAPTURE


def _create_customer_campaign_fallback():
    op.create_index(
        "uq_outbound_messages_customer_campaign_fallback",
        "outbound_messages",
        ["customer_id", "campaign_id", sa.text("(fallback_for IS NOT NULL)")],
        unique=True,
    )


def _drop_customer_campaign():
    with op.batch_alter_table("outbound_messages") as batch:
        batch.drop_constraint("uq_outbound_messages_customer_campaign", type_="unique")


def upgrade():
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("sms_fallback", sa.JSON(), nullable=True))
    with op.batch_alter_table("outbound_messages") as batch:
        batch.add_column(sa.Column("fallback_for", sa.BigInteger(), nullable=True))
    # One message per customer per campaign on its own channel, and one fallback. On PostgreSQL the new index
    # is built before the old constraint goes, so that no moment is without one; SQLite's batch mode copies
    # the table to drop a constraint, and would lose an expression index made before.
    if op.get_context().dialect.name == "sqlite":
        _drop_customer_campaign()
        _create_customer_campaign_fallback()
    else:
        _create_customer_campaign_fallback()
        _drop_customer_campaign()
    _create_fallback_for()
    if op.get_context().dialect.name == "postgresql":
        op.execute(CAPTURE)


def _create_fallback_for():
    op.create_index(
        "uq_outbound_messages_fallback_for",
        "outbound_messages",
        ["campaign_id", "fallback_for"],
        unique=True,
        postgresql_where=sa.text("fallback_for IS NOT NULL"),
        sqlite_where=sa.text("fallback_for IS NOT NULL"),
    )


def create_indexes():
    """The two indexes this migration makes (a later migration's SQLite downgrade makes them again)."""
    _create_customer_campaign_fallback()
    _create_fallback_for()


def downgrade():
    if op.get_context().dialect.name == "postgresql":
        op.execute(_capture_of("0015_links.py"))
    op.drop_index("uq_outbound_messages_fallback_for", table_name="outbound_messages")
    op.execute("DELETE FROM outbound_messages WHERE fallback_for IS NOT NULL")
    op.drop_index("uq_outbound_messages_customer_campaign_fallback", table_name="outbound_messages")
    with op.batch_alter_table("outbound_messages") as batch:
        batch.create_unique_constraint("uq_outbound_messages_customer_campaign", ["customer_id", "campaign_id"])
        batch.drop_column("fallback_for")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("sms_fallback")
