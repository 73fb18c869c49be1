"""recent visits: the instants of each customer's latest visits on the customer row

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 09:00:00

- `customers.recent_visits`: a JSON array of the instants of the customer's latest 16 visits,
  newest first, in whole seconds since 1970 (compact: the customer row is read and rewritten
  by every tick that moves its stage), kept by ingestion beside `last_visit_at`. A condition such as
  `visits_30d >= 6` holds exactly when the sixth of them falls inside the window (and no visit
  lies after the tick's instant), so the tick reads it from the row it already holds instead of
  counting the customer's events. NULL means not computed: those customers' counts read the
  events, as before.

The column is filled here for the customers already stored, in one statement per dialect.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_LATEST = ("SELECT occurred_at FROM events WHERE events.customer_id = customers.id "
           "AND events.kind = 'visit' ORDER BY occurred_at DESC LIMIT 16")


def upgrade() -> None:
    op.add_column("customers", sa.Column("recent_visits", sa.JSON(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE customers SET recent_visits = (SELECT coalesce(json_agg("
                   "CAST(floor(extract(epoch FROM v.occurred_at)) AS BIGINT) "
                   f"ORDER BY v.occurred_at DESC), '[]'::json) FROM ({_LATEST}) v)")
    else:
        op.execute("UPDATE customers SET recent_visits = (SELECT json_group_array("
                   f"CAST(strftime('%s', occurred_at) AS INTEGER)) FROM ({_LATEST}))")


def downgrade() -> None:
    with op.batch_alter_table("customers") as batch_op:
        batch_op.drop_column("recent_visits")
