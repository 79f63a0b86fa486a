"""links: a campaign's track_links; a message's original links, its clicks per link, clicks and first click;
clicked and clicks in the kept campaign counts

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 19:30:00.000000

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# Migration 0011's trigger function, counting clicks too: `clicked` (messages with a first click) and
# `clicks`. A click is an UPDATE that changes no status: its net change is +1 click (and +1 clicked the
# first time) under the message's status.
CAPTURE = """
CREATE OR REPLACE FUNCTION campaign_message_counts_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, status, count(*), count(read_at), coalesce(sum(segments), 0),
               count(first_clicked_at), coalesce(sum(clicks), 0)
        FROM new_rows GROUP BY campaign_id, status;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, status, -count(*), -count(read_at), -coalesce(sum(segments), 0),
               -count(first_clicked_at), -coalesce(sum(clicks), 0)
        FROM old_rows GROUP BY campaign_id, status;
    ELSE
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments, clicked, clicks)
        SELECT campaign_id, status, sum(messages), sum(read), sum(segments), sum(clicked), sum(clicks)
        FROM (
            SELECT campaign_id, status, 1 AS messages, (read_at IS NOT NULL)::int AS read,
                   coalesce(segments, 0) AS segments, (first_clicked_at IS NOT NULL)::int AS clicked,
                   clicks
            FROM new_rows
            UNION ALL
            SELECT campaign_id, status, -1, -(read_at IS NOT NULL)::int, -coalesce(segments, 0),
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

# Migration 0011's function, for the downgrade.
CAPTURE_0011 = """
CREATE OR REPLACE FUNCTION campaign_message_counts_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments)
        SELECT campaign_id, status, count(*), count(read_at), coalesce(sum(segments), 0)
        FROM new_rows GROUP BY campaign_id, status;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments)
        SELECT campaign_id, status, -count(*), -count(read_at), -coalesce(sum(segments), 0)
        FROM old_rows GROUP BY campaign_id, status;
    ELSE
        INSERT INTO campaign_message_count_changes (campaign_id, status, messages, read, segments)
        SELECT campaign_id, status, sum(messages), sum(read), sum(segments)
        FROM (
            SELECT campaign_id, status, 1 AS messages, (read_at IS NOT NULL)::int AS read,
                   coalesce(segments, 0) AS segments
            FROM new_rows
            UNION ALL
            SELECT campaign_id, status, -1, -(read_at IS NOT NULL)::int, -coalesce(segments, 0)
            FROM old_rows
        ) AS change
        GROUP BY campaign_id, status
        HAVING sum(messages) <> 0 OR sum(read) <> 0 OR sum(segments) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""

_COUNTS = ("campaign_message_counts", "campaign_message_count_changes")


def upgrade():
    json_object = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        # Campaigns made before keep their bodies exactly as rendered; the API makes new ones with it on.
        batch_op.add_column(sa.Column("track_links", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("links", json_object, nullable=True))
        batch_op.add_column(sa.Column("link_clicks", json_object, nullable=True))
        # A constant default: a metadata-only change on PostgreSQL, however many rows.
        batch_op.add_column(sa.Column("clicks", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("first_clicked_at", sa.DateTime(timezone=True), nullable=True))
    for table in _COUNTS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("clicked", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
            batch_op.add_column(sa.Column("clicks", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CAPTURE)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CAPTURE_0011)
    for table in _COUNTS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("clicks")
            batch_op.drop_column("clicked")
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_column("first_clicked_at")
        batch_op.drop_column("clicks")
        batch_op.drop_column("link_clicks")
        batch_op.drop_column("links")
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("track_links")
