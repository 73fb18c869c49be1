"""The migrations build the schema the models describe, on every backend."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine

from engine.db import migrate
from engine.models import Base


def test_migrations_match_the_models(db: Engine) -> None:
    migrate(db)  # already at head: a no-op that must not fail
    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
