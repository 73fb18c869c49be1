"""the tables the tick writes in bulk lose their foreign keys

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 17:00:00

Dropped: `occurrences.customer_id`, `stage_history.customer_id`, `outbox.customer_id` and
`outbox.occurrence_id`. The tick writes these rows by INSERT ... SELECT from the customers it
has just read (and the outbox from the occurrences it has just written, in the same
transaction), so each row refers to a row that exists by construction. The check cost more than
the write: PostgreSQL runs a `SELECT ... FOR KEY SHARE` on the parent per inserted row, and on a
million customers the steady tick took 7.1-7.4 s with the keys and 4.9-5.2 s without them, the
first tick 75 s and 59 s (bench/README). Nothing in the engine deletes a customer or an
occurrence. The keys of the tables written from outside (memberships, events, conversions, the
consent log) and of `outcomes` stay: their rows name a customer or message the caller chose.

SQLite rebuilds the three tables (batch mode); the outbox first, so that no table still refers
to `occurrences` while it is rebuilt.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# (table, column, referred table): the outbox first, see above
DROPPED = (
    ("outbox", "occurrence_id", "occurrences"),
    ("outbox", "customer_id", "customers"),
    ("occurrences", "customer_id", "customers"),
    ("stage_history", "customer_id", "customers"),
)


def _name(table: str, column: str, referred: str) -> str:
    return f"fk_{table}_{column}_{referred}"


def upgrade() -> None:
    for table in ("outbox", "occurrences", "stage_history"):
        with op.batch_alter_table(table) as batch_op:
            for name in (_name(*key) for key in DROPPED if key[0] == table):
                batch_op.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table in ("stage_history", "occurrences", "outbox"):
        with op.batch_alter_table(table) as batch_op:
            for key in reversed([key for key in DROPPED if key[0] == table]):
                batch_op.create_foreign_key(_name(*key), key[2], [key[1]], ["id"])
