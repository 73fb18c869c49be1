"""tick instants: ticks by the instant they evaluated

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 11:30:00

- `ticks (now)`: a full tick finds the occurrences of an `every: N` trigger that left its
  window since the previous full tick through the ticks that fired them N days earlier (an
  occurrence's `fired_at` is its tick's instant), then their rows through `occurrences
  (tick_id)`, instead of reading every occurrence of the trigger.

The ticks table holds a row per tick (about 1,500 a day under the scheduler): a plain build.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_ticks_now"), "ticks", ["now"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ticks_now"), table_name="ticks")
