"""the outbox records each message's membership, and is indexed for the policy's counts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 15:00:00

- `outbox.membership_id`: the membership of the message's occurrence, the cycle it counts
  against. Filled from the occurrences for the messages already stored.
- `outbox (customer_id, membership_id)` and `outbox (customer_id, due_at)` replace
  `outbox (customer_id, created_at)`. The contact policy counts, for each customer messaged
  in a tick, the messages of the customer's current membership (cycle budgets) and those due
  within the longest frequency cap's window; it read every earlier marketing message of the
  customer and its occurrence to find its membership, so a club's ticks slowed down as its
  history grew (bench/README). The API's list of a customer's messages, newest first, reads
  the customer's messages through `(customer_id, due_at)` and orders them.

The fill and the index builds run in the migration's transaction: the outbox is rewritten
row by row anyway, and a dispatcher waits for the migration to end.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("membership_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                     nullable=True))
    op.execute("UPDATE outbox SET membership_id = (SELECT o.membership_id FROM occurrences o "
               "WHERE o.id = outbox.occurrence_id)")
    op.drop_index(op.f("ix_outbox_customer_id_created_at"), table_name="outbox")
    op.create_index(op.f("ix_outbox_customer_id_due_at"), "outbox", ["customer_id", "due_at"])
    op.create_index(op.f("ix_outbox_customer_id_membership_id"), "outbox",
                    ["customer_id", "membership_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_outbox_customer_id_membership_id"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_customer_id_due_at"), table_name="outbox")
    op.create_index(op.f("ix_outbox_customer_id_created_at"), "outbox",
                    ["customer_id", "created_at"])
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("membership_id")
