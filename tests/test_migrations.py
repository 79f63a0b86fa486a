"""The migration history builds the schema the models describe, on SQLite and on PostgreSQL, and unwinds."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import inspect

from app.extensions import db
from tests.conftest import MIGRATIONS


def test_migrations_match_the_models_and_downgrade_cleanly(app):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
    assert diff == []
    downgrade(directory=MIGRATIONS, revision="base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(directory=MIGRATIONS)
    assert {"customers", "campaigns", "outbound_messages"} <= set(inspect(db.engine).get_table_names())
