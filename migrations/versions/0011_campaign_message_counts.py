"""campaign message counts: kept by triggers on outbound_messages (PostgreSQL), read by the stats; customers
by location newest first

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 17:00:00.000000

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# One function for the three triggers. Statement-level with transition tables: an INSERT ... SELECT of a
# million messages appends one row per status, not a million; a send job's one-row UPDATE appends at most
# two (the old status -1, the new +1) and an UPDATE that changes no count (a retry's error, a hold until
# quiet hours end) appends none. Changes are appended, never updated in place, so writers never wait on
# each other here; `app.messaging.stats.fold` moves them into campaign_message_counts.
CAPTURE = """
CREATE FUNCTION campaign_message_counts_capture() RETURNS trigger LANGUAGE plpgsql AS $$
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

TRIGGERS = {
    "INSERT": "REFERENCING NEW TABLE AS new_rows",
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "DELETE": "REFERENCING OLD TABLE AS old_rows",
}

# The counts of the messages already there, taken under the triggers' lock (creating a trigger blocks
# writes to the table until this migration commits), so none is missed or counted twice.
BACKFILL = """
INSERT INTO campaign_message_counts (campaign_id, status, messages, read, segments)
SELECT campaign_id, status, count(*), count(read_at), coalesce(sum(segments), 0)
FROM outbound_messages GROUP BY campaign_id, status
"""


def _counts_columns():
    return [
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("messages", sa.BigInteger(), nullable=False),
        sa.Column("read", sa.BigInteger(), nullable=False),
        sa.Column("segments", sa.BigInteger(), nullable=False),
    ]


def upgrade():
    op.create_table(
        "campaign_message_counts", *_counts_columns(), sa.PrimaryKeyConstraint("campaign_id", "status")
    )
    op.create_table(
        "campaign_message_count_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        *_counts_columns(),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_campaign_message_count_changes_campaign_id", "campaign_message_count_changes", ["campaign_id"]
    )
    # The list filtered by location, walked by cursor, reads this index in order instead of sorting a
    # location's customers on every page; it serves the audience sends as the old one did.
    op.create_index("ix_customers_location_id", "customers", ["location", "id"])
    op.drop_index("ix_customers_location", table_name="customers")
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite (tests, a local run): the stats count the rows themselves
    op.execute(CAPTURE)
    for event, referencing in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER outbound_messages_count_{event.lower()} AFTER {event} ON outbound_messages "
            f"{referencing} FOR EACH STATEMENT EXECUTE FUNCTION campaign_message_counts_capture()"
        )
    op.execute(BACKFILL)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        for event in TRIGGERS:
            op.execute(f"DROP TRIGGER outbound_messages_count_{event.lower()} ON outbound_messages")
        op.execute("DROP FUNCTION campaign_message_counts_capture()")
    op.create_index("ix_customers_location", "customers", ["location"])
    op.drop_index("ix_customers_location_id", table_name="customers")
    op.drop_index("ix_campaign_message_count_changes_campaign_id", table_name="campaign_message_count_changes")
    op.drop_table("campaign_message_count_changes")
    op.drop_table("campaign_message_counts")
