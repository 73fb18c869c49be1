"""evaluation indexes: events by kind and time, customers by stage and time zone

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 06:20:00

- `events (kind, occurred_at, customer_id)`, with the event id (SQLite keeps the rowid in every
  index; PostgreSQL needs `INCLUDE (id)`): an event trigger's first evaluation reads the events
  of its `within` window (two days of visits by default), not every event of its kind, and
  finds their customers and ids in the index, without reading the event rows;
- `customers (stage, timezone)`, beside `customers (stage)`: a schedule trigger whose slot has
  passed in a few zones reads the customers of its stages in those zones, not every customer of
  the stage. Reads of a whole stage (all zones, or the club's own, where most customers are)
  keep `customers (stage)`, which returns them in key order: through the composite index they
  come zone by zone, a pass over the table per zone.

On PostgreSQL the indexes are built CONCURRENTLY, outside the migration's transaction: a club's
events table holds tens of millions of rows, and a plain CREATE INDEX would hold up ingestion
for minutes. A concurrent build that was interrupted leaves an invalid index behind; the next
run of the migration drops it and builds it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


@contextmanager
def _online() -> Iterator[dict[str, Any]]:
    """The dialect options of an index change that does not block writers: on PostgreSQL,
    CONCURRENTLY, outside the migration's transaction."""
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            yield {"postgresql_concurrently": True}
    else:
        yield {}


def _drop_if_invalid(name: str, table: str, options: dict[str, Any]) -> None:
    """Drop what an interrupted concurrent build of `name` left: an index marked invalid."""
    if op.get_bind().dialect.name != "postgresql":
        return
    invalid = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %(name)s AND NOT i.indisvalid", {"name": name}).first()
    if invalid is not None:
        op.drop_index(name, table_name=table, **options)


def upgrade() -> None:
    with _online() as options:
        _drop_if_invalid("ix_events_kind_occurred_at_customer_id", "events", options)
        _drop_if_invalid("ix_customers_stage_timezone", "customers", options)
        op.create_index(op.f("ix_events_kind_occurred_at_customer_id"), "events",
                        ["kind", "occurred_at", "customer_id"], postgresql_include=["id"],
                        **options)
        op.create_index(op.f("ix_customers_stage_timezone"), "customers", ["stage", "timezone"],
                        **options)


def downgrade() -> None:
    with _online() as options:
        op.drop_index(op.f("ix_customers_stage_timezone"), table_name="customers", **options)
        op.drop_index(op.f("ix_events_kind_occurred_at_customer_id"), table_name="events",
                      **options)
