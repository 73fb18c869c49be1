"""Alembic environment: the engine comes from `engine.db.migrate`, or from TOUCHPOINTS settings."""

from __future__ import annotations

from alembic import context

from engine.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    from engine.db import make_engine
    from engine.settings import Settings

    engine = make_engine(Settings().database_url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
