"""The migrations build the schema the models describe, on every backend."""

from __future__ import annotations

from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select
from sqlalchemy.exc import IntegrityError

from engine.db import alembic_config, migrate
from engine.models import RECENT_VISITS, Base, Customer, Message, Occurrence, StageChange


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


def test_customer_anchor_indexes_survive_a_run_stopped_half_way(db: Engine) -> None:
    """0009 builds two indexes and drops one; on PostgreSQL each step commits on its own. Run
    again after a stop between them (the new indexes built, the version not yet recorded), it
    finishes instead of failing on an index that exists, and the schema is the models'."""
    command.downgrade(alembic_config(db), "0008")
    with db.begin() as conn:
        for column in ("membership_starts_on", "membership_ends_on"):
            conn.exec_driver_sql(f"CREATE INDEX ix_customers_{column} ON customers ({column})")
    migrate(db)
    with db.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


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


def _foreign_keys(db: Engine, table: str) -> set[str]:
    return {str(fk["name"]) for fk in inspect(db).get_foreign_keys(table)}


def test_the_tables_the_tick_writes_lose_their_foreign_keys_and_keep_their_rows(
        db: Engine) -> None:
    """0005 drops the foreign keys of occurrences, outbox and stage_history (SQLite rebuilds the
    tables): the rows, the unique keys and the indexes stay; downgrading puts the keys back."""
    command.downgrade(alembic_config(db), "0004")
    assert "fk_outbox_occurrence_id_occurrences" in _foreign_keys(db, "outbox")
    at = "'2026-03-02 10:00:00.000000'"
    with db.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO customers (id, external_id, attributes, created_at, updated_at, "
            "visit_count, lifetime_value, change_seq) "
            f"VALUES (7, 'c7', '{{}}', {at}, {at}, 0, 0, 0)")
        conn.exec_driver_sql(
            "INSERT INTO occurrences (id, trigger_id, customer_id, scope_key, tick_id, fired_at, "
            f"arm, status) VALUES (11, 'welcome', 7, 'ever', 1, {at}, 'treatment', 'message')")
        conn.exec_driver_sql(
            "INSERT INTO outbox (id, occurrence_id, customer_id, trigger_id, channel, template, "
            "status, due_at, created_at, attempts) VALUES "
            f"(13, 11, 7, 'welcome', 'console', 'welcome.txt', 'queued', {at}, {at}, 0)")
        conn.exec_driver_sql(
            "INSERT INTO stage_history (id, customer_id, stage, entered_at) "
            f"VALUES (17, 7, 'onboarding', {at})")
    migrate(db)
    assert [_foreign_keys(db, t) for t in ("occurrences", "outbox", "stage_history")] == [
        set(), set(), set()]
    assert _foreign_keys(db, "events") == {"fk_events_customer_id_customers"}
    with db.connect() as conn:
        assert conn.execute(select(Occurrence.id, Occurrence.customer_id)).all() == [(11, 7)]
        assert conn.execute(select(Message.id, Message.occurrence_id)).all() == [(13, 11)]
        assert conn.execute(select(StageChange.id, StageChange.stage)).all() == [
            (17, "onboarding")]
        with pytest.raises(IntegrityError):  # the re-entry key survived the rebuild
            conn.exec_driver_sql(
                "INSERT INTO occurrences (trigger_id, customer_id, scope_key, tick_id, fired_at, "
                f"arm, status) VALUES ('welcome', 7, 'ever', 2, {at}, 'treatment', 'message')")
    command.downgrade(alembic_config(db), "0004")
    assert _foreign_keys(db, "outbox") == {"fk_outbox_occurrence_id_occurrences",
                                           "fk_outbox_customer_id_customers"}
    assert _foreign_keys(db, "stage_history") == {"fk_stage_history_customer_id_customers"}
    migrate(db)


def test_the_outbox_takes_each_message_s_membership_from_its_occurrence(db: Engine) -> None:
    """0007 adds `outbox.membership_id`, filled from the messages' occurrences (none where the
    occurrence has none), and swaps the outbox's (customer, created_at) index for the two the
    contact policy counts through; downgrading swaps them back."""
    command.downgrade(alembic_config(db), "0006")
    at = "'2026-03-02 10:00:00.000000'"
    with db.begin() as conn:
        for occurrence, membership in ((11, "5"), (12, "NULL")):
            conn.exec_driver_sql(
                "INSERT INTO occurrences (id, trigger_id, customer_id, membership_id, scope_key, "
                f"tick_id, fired_at, arm, status) VALUES ({occurrence}, 'welcome', 7, "
                f"{membership}, 'ever-{occurrence}', 1, {at}, 'treatment', 'message')")
            conn.exec_driver_sql(
                "INSERT INTO outbox (id, occurrence_id, customer_id, trigger_id, channel, "
                f"template, status, due_at, created_at, attempts) VALUES ({occurrence + 10}, "
                f"{occurrence}, 7, 'welcome', 'console', 'welcome.txt', 'queued', {at}, {at}, 0)")
    migrate(db)
    with db.connect() as conn:
        assert conn.execute(select(Message.id, Message.membership_id)
                            .order_by(Message.id)).all() == [(21, 5), (22, None)]
    indexes = {i["name"] for i in inspect(db).get_indexes("outbox")}
    assert {"ix_outbox_customer_id_membership_id", "ix_outbox_customer_id_due_at"} <= indexes
    assert "ix_outbox_customer_id_created_at" not in indexes
    command.downgrade(alembic_config(db), "0006")
    assert "ix_outbox_customer_id_created_at" in {
        i["name"] for i in inspect(db).get_indexes("outbox")}
    migrate(db)
