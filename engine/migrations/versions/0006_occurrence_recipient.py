"""occurrences record the recipient: the contact point their message goes to

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 05:00:00

- `occurrences.recipient`: the customer's address on the occurrence's channel (email, phone
  number or chat id) when the occurrence is to be sent, NULL otherwise. The occurrence INSERT
  already reads the customer's contact columns to choose the channel; the tick's outbox INSERT
  now copies the recipient from here instead of looking every messaged customer up again
  (on PostgreSQL at a million customers, 0.53 s of that statement's 0.94 s was that lookup,
  bench/README).

No backfill: an occurrence's message is written in the tick that records it, so no occurrence
stored before this migration is waiting for its recipient.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("occurrences", sa.Column("recipient", sa.String(320), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("occurrences") as batch_op:
        batch_op.drop_column("recipient")
