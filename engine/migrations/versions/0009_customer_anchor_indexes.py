"""customers indexed by their current membership's dates

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 05:00:00

- `customers (membership_starts_on)`, `customers (membership_ends_on)`: a date-relative trigger
  reads the customers whose current membership starts or ends on its anchor date from their own
  rows (the columns of migration 0008), and a full tick finds the customers whose day count to
  a membership date crossed a boundary the same way. Both read `memberships` by date before: a
  date trigger then each due customer through `current_membership_id`, a membership row and a
  customer row per customer (on PostgreSQL at a million customers, the steady tick's eleven
  date triggers about 740 ms before, 450 ms after; bench/README).
- `customers (current_membership_id)` dropped: that lookup was its only reader.

On PostgreSQL the indexes are built and dropped CONCURRENTLY, outside the migration's
transaction (as in 0002): a plain CREATE INDEX on a club's customers would hold up ingestion.
Each step there commits on its own, so a run stopped half way is run again from the start:
an index already built is kept, one whose build was interrupted is built again, one already
dropped stays dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ANCHORS = ("membership_starts_on", "membership_ends_on")


@contextmanager
def _online() -> Iterator[dict[str, Any]]:
    """The dialect options of an index change that does not block writers: on PostgreSQL,
    CONCURRENTLY, outside the migration's transaction."""
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            yield {"postgresql_concurrently": True}
    else:
        yield {}


def _drop_if_invalid(name: str, options: dict[str, Any]) -> None:
    """Drop what an interrupted concurrent build of `name` left: an index marked invalid."""
    if op.get_bind().dialect.name != "postgresql":
        return
    invalid = op.get_bind().exec_driver_sql(
        "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %(name)s AND NOT i.indisvalid", {"name": name}).first()
    if invalid is not None:
        op.drop_index(name, table_name="customers", **options)


def upgrade() -> None:
    with _online() as options:
        for column in ANCHORS:
            _drop_if_invalid(f"ix_customers_{column}", options)
            op.create_index(op.f(f"ix_customers_{column}"), "customers", [column],
                            if_not_exists=True, **options)
        op.drop_index(op.f("ix_customers_current_membership_id"), table_name="customers",
                      if_exists=True, **options)


def downgrade() -> None:
    with _online() as options:
        _drop_if_invalid("ix_customers_current_membership_id", options)
        op.create_index(op.f("ix_customers_current_membership_id"), "customers",
                        ["current_membership_id"], if_not_exists=True, **options)
        for column in reversed(ANCHORS):
            op.drop_index(op.f(f"ix_customers_{column}"), table_name="customers",
                          if_exists=True, **options)
