"""evaluation indexes: events by kind and time, customers by stage and time zone

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 06:20:00

- `events (kind, occurred_at, customer_id)`: an event trigger's first evaluation reads the
  events of its `within` window (two days of visits by default), not every event of its kind,
  and finds their customers in the index, without reading the event rows;
- `customers (stage, timezone)` replaces `customers (stage)`: a schedule trigger reads the
  customers of its stages in the zones where its slot passed, not every customer of the stage;
  reads by stage alone use its first column.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_kind_occurred_at_customer_id"),
                              ["kind", "occurred_at", "customer_id"], unique=False)
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_customers_stage_timezone"), ["stage", "timezone"],
                              unique=False)
        batch_op.drop_index(batch_op.f("ix_customers_stage"))


def downgrade() -> None:
    with op.batch_alter_table("customers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_customers_stage"), ["stage"], unique=False)
        batch_op.drop_index(batch_op.f("ix_customers_stage_timezone"))
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_kind_occurred_at_customer_id"))
