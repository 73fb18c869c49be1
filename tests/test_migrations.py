"""The migrations build the schema the models describe, on every backend."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from engine.db import alembic_config, migrate
from engine.models import Base


def test_migrations_match_the_models(db: Engine) -> None:
    migrate(db)  # already at head: a no-op that must not fail
    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_an_interrupted_concurrent_index_build_is_redone(db: Engine) -> None:
    """On PostgreSQL, 0002 builds its indexes CONCURRENTLY; a build cut short leaves an invalid
    index under the final name. Running the migration again drops and rebuilds it."""
    if db.dialect.name != "postgresql":
        pytest.skip("SQLite builds indexes inside the migration's transaction")
    command.downgrade(alembic_config(db), "0001")
    with db.begin() as conn:
        # what an interrupted CREATE INDEX CONCURRENTLY leaves: the index, marked invalid
        conn.exec_driver_sql("CREATE INDEX ix_events_kind_occurred_at_customer_id ON events (kind)")
        conn.exec_driver_sql(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
            "'ix_events_kind_occurred_at_customer_id'::regclass")
    migrate(db)
    with db.connect() as conn:
        valid, definition = conn.exec_driver_sql(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indexrelid = 'ix_events_kind_occurred_at_customer_id'::regclass").one()
    assert valid
    assert "(kind, occurred_at, customer_id) INCLUDE (id)" in definition
