"""The migrations build the schema the models describe, on every backend."""

from __future__ import annotations

from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, select

from engine.db import alembic_config, migrate
from engine.models import RECENT_VISITS, Base, Customer


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


def test_recent_visits_are_filled_for_the_customers_already_stored(db: Engine) -> None:
    """0004 adds `customers.recent_visits` and fills it from the stored events: each customer's
    own latest visits, newest first, in whole seconds since 1970; [] for none."""
    command.downgrade(alembic_config(db), "0003")
    stamps = [f"2026-03-0{d} 1{h}:00:00.750000" for d in range(1, 10) for h in (0, 5)]  # 18
    with db.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO customers (id, external_id, attributes, created_at, updated_at, "
            "visit_count, lifetime_value, change_seq) VALUES "
            "(1, 'c1', '{}', '2026-01-01', '2026-01-01', 0, 0, 0), "
            "(2, 'c2', '{}', '2026-01-01', '2026-01-01', 0, 0, 0), "
            "(3, 'c3', '{}', '2026-01-01', '2026-01-01', 0, 0, 0)")
        rows = [(1, "visit", s) for s in stamps] + [(2, "visit", "2026-02-01 08:00:00.000000"),
                                                     (2, "booking", "2026-03-09 08:00:00.000000")]
        for i, (customer, kind, at) in enumerate(rows, start=1):
            conn.exec_driver_sql(
                "INSERT INTO events (id, customer_id, kind, occurred_at, received_at, properties)"
                f" VALUES ({i}, {customer}, '{kind}', '{at}', '{at}', '{{}}')")
    migrate(db)
    with db.connect() as conn:
        kept = dict(conn.execute(
            select(Customer.id, Customer.recent_visits).order_by(Customer.id)).all())
    latest = sorted(stamps, reverse=True)[:RECENT_VISITS]
    epoch = datetime(1970, 1, 1)
    assert kept == {
        1: [int((datetime.fromisoformat(t) - epoch).total_seconds() // 1) for t in latest],
        2: [int((datetime(2026, 2, 1, 8, 0) - epoch).total_seconds())], 3: []}
