"""The database schema: one table per concept of the vocabulary, indexed for the evaluation queries.

Timestamps are naive UTC; membership terms are calendar dates. `customers` carries a few
denormalised activity columns (last visit, visit count, lifetime value, current membership, stage)
that ingestion and the tick keep current, so that a tick over the whole base reads one row per
customer instead of aggregating the event history.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "RECENT_VISITS",
    "Base",
    "table",
    "ConsentEntry",
    "Conversion",
    "Counter",
    "Customer",
    "Event",
    "Lease",
    "MEMBERSHIP_MIRROR",
    "Membership",
    "Message",
    "MessageStatus",
    "Occurrence",
    "OccurrenceStatus",
    "Outcome",
    "RuleFileVersion",
    "StageChange",
    "Tick",
    "TriggerState",
]

# Integer primary keys that autoincrement on SQLite (rowid alias) and PostgreSQL (bigserial).
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(), date: Date()}


def table(model: type[Base]) -> Table:
    """The Core table of a mapped class, typed as a Table for insert/update statements."""
    mapped = model.__table__
    assert isinstance(mapped, Table)
    return mapped


class OccurrenceStatus(StrEnum):
    """What became of one firing of a trigger."""

    MESSAGE = "message"
    HELD_OUT = "held_out"
    SKIPPED = "skipped"
    DRY_RUN = "dry_run"


class MessageStatus(StrEnum):
    """Where a message is in the outbox; later members never go back to earlier ones."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNKNOWN = "unknown"


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    first_name: Mapped[str | None] = mapped_column(String(128))
    last_name: Mapped[str | None] = mapped_column(String(128))
    email: Mapped[str | None] = mapped_column(String(320))
    phone: Mapped[str | None] = mapped_column(String(32))
    chat_id: Mapped[str | None] = mapped_column(String(64))
    timezone: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(16))
    segment: Mapped[str | None] = mapped_column(String(32))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # Denormalised activity, maintained by ingestion.
    last_visit_at: Mapped[datetime | None]
    visit_count: Mapped[int] = mapped_column(default=0)
    lifetime_value: Mapped[float] = mapped_column(Float, default=0.0)
    current_membership_id: Mapped[int | None] = mapped_column(BigId)
    # The current membership's columns, kept with its id by ingestion (NULL without one): ticks
    # read the membership from the customer's own row instead of looking it up in `memberships`
    # (`engine.metrics.RowMembership`), and find a date trigger's due customers by its dates.
    membership_plan: Mapped[str | None] = mapped_column(String(64))
    membership_price: Mapped[float | None] = mapped_column(Float)
    membership_starts_on: Mapped[date | None]
    membership_ends_on: Mapped[date | None]
    membership_status: Mapped[str | None] = mapped_column(String(16))
    # The instants of the customer's latest RECENT_VISITS visits, newest first, in whole seconds
    # since 1970 (a JSON array); NULL where ingestion has not computed them (then the windowed
    # visit counts read the events).
    recent_visits: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True))
    # Lifecycle position, maintained by the tick.
    stage: Mapped[str | None] = mapped_column(String(32))
    stage_membership_id: Mapped[int | None] = mapped_column(BigId)
    stage_since: Mapped[datetime | None]
    # Bumped from the `change` counter whenever ingestion touches the customer or their data.
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0, index=True)

    # stage: a whole stage, in key order; (stage, timezone): a schedule trigger's stages in the
    # few zones where its slot passed; the membership's dates: date-relative triggers read the
    # customers whose membership starts or ends on their anchor date; these and last_visit_at:
    # the tick finds whose day counts crossed a boundary.
    __table_args__ = (Index(None, "stage"), Index(None, "stage", "timezone"),
                      Index(None, "timezone"), Index(None, "membership_starts_on"),
                      Index(None, "membership_ends_on"), Index(None, "last_visit_at"))


# How many of a customer's latest visits `Customer.recent_visits` keeps: a condition comparing a
# windowed visit count with at most this many reads it instead of counting the customer's events.
RECENT_VISITS = 16


class Membership(Base):
    __tablename__ = "memberships"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    plan: Mapped[str | None] = mapped_column(String(64))
    price: Mapped[float | None] = mapped_column(Float)
    starts_on: Mapped[date]
    ends_on: Mapped[date]
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index(None, "customer_id", "starts_on"),
        Index(None, "ends_on"),
        Index(None, "starts_on"),
    )


# A customer's copy of their current membership: customer column -> membership column.
MEMBERSHIP_MIRROR = {"membership_plan": "plan", "membership_price": "price",
                     "membership_starts_on": "starts_on", "membership_ends_on": "ends_on",
                     "membership_status": "status"}


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    kind: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime]
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)

    # (customer_id, kind, occurred_at): windowed counts per customer; (kind, id): the events
    # since an event trigger's watermark; (kind, occurred_at, customer_id) with the id: the
    # events of a trigger's `within` window at its first evaluation, read from the index alone.
    __table_args__ = (
        Index(None, "customer_id", "kind", "occurred_at"),
        Index(None, "kind", "id"),
        Index(None, "kind", "occurred_at", "customer_id", postgresql_include=["id"]),
    )


class StageChange(Base):
    __tablename__ = "stage_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[int] = mapped_column(BigId)  # no foreign key (migration 0005)
    membership_id: Mapped[int | None] = mapped_column(BigId)
    stage: Mapped[str] = mapped_column(String(32))
    previous_stage: Mapped[str | None] = mapped_column(String(32))
    entered_at: Mapped[datetime]
    tick_id: Mapped[int | None] = mapped_column(BigId)

    __table_args__ = (
        Index(None, "stage", "id"), Index(None, "customer_id", "id"), Index(None, "tick_id"))


class RuleFileVersion(Base):
    __tablename__ = "rule_file_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)
    loaded_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("path", "sha256"),)


class TriggerState(Base):
    __tablename__ = "trigger_states"

    trigger_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    rule_file_version_id: Mapped[int | None] = mapped_column(BigId)
    path: Mapped[str | None] = mapped_column(String(512))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    errors: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Highest event / stage-history id already considered by event and stage-entry triggers.
    event_watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    stage_watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    last_tick_at: Mapped[datetime | None]
    fired_total: Mapped[int] = mapped_column(BigInteger, default=0)


class Tick(Base):
    __tablename__ = "ticks"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    now: Mapped[datetime]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index(None, "now"),)


class Occurrence(Base):
    __tablename__ = "occurrences"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trigger_id: Mapped[str] = mapped_column(String(128))
    customer_id: Mapped[int] = mapped_column(BigId)  # no foreign key (migration 0005)
    # Re-entry scope: `cycle:<membership id>`, `ever`, `event:<event id>`, `day:<date>` ...
    scope_key: Mapped[str] = mapped_column(String(64))
    membership_id: Mapped[int | None] = mapped_column(BigId)
    event_id: Mapped[int | None] = mapped_column(BigId)
    rule_file_version_id: Mapped[int | None] = mapped_column(BigId)
    tick_id: Mapped[int] = mapped_column(BigId)
    fired_at: Mapped[datetime]
    stage: Mapped[str | None] = mapped_column(String(32))
    arm: Mapped[str] = mapped_column(String(16), default="treatment")
    variant: Mapped[str | None] = mapped_column(String(64))
    channel: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=OccurrenceStatus.MESSAGE)
    reason: Mapped[str | None] = mapped_column(String(256))
    # the customer's address on `channel` while the occurrence is to be sent (migration 0006)
    recipient: Mapped[str | None] = mapped_column(String(320))
    # the contact policy's deferral (quiet hours): the message is not sent before this instant
    not_before: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("trigger_id", "customer_id", "scope_key"),
        Index(None, "tick_id"),
        Index(None, "customer_id", "fired_at"),
    )


class Message(Base):
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # no foreign keys: the tick writes these rows from rows it has just read (migration 0005)
    occurrence_id: Mapped[int] = mapped_column(BigId, unique=True)
    customer_id: Mapped[int] = mapped_column(BigId)
    trigger_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(32))
    template: Mapped[str] = mapped_column(String(256))
    recipient: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.QUEUED)
    due_at: Mapped[datetime]
    created_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claim_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    sent_at: Mapped[datetime | None]
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    cost: Mapped[float | None]  # the channel's cost per message (config/policy.yaml)
    # the occurrence's membership: the cycle the message counts against (migration 0007)
    membership_id: Mapped[int | None] = mapped_column(BigId)

    # (status, due_at): the dispatcher's claim; (customer_id, membership_id): the contact
    # policy counts a customer's messages of the current cycle, (customer_id, due_at) those of
    # a cap's window, each without reading the customer's older messages
    __table_args__ = (Index(None, "status", "due_at"), Index(None, "customer_id", "due_at"),
                      Index(None, "customer_id", "membership_id"))


class Outcome(Base):
    __tablename__ = "outcomes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"))
    status: Mapped[str] = mapped_column(String(16))
    occurred_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Provider callbacks carry an id; a duplicate callback is recorded once.
    dedupe_key: Mapped[str | None] = mapped_column(String(256), unique=True)

    __table_args__ = (Index(None, "message_id", "occurred_at"),)


class Conversion(Base):
    __tablename__ = "conversions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    membership_id: Mapped[int | None] = mapped_column(BigId)
    event_id: Mapped[int | None] = mapped_column(BigId, unique=True)
    goal_event: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime]

    __table_args__ = (Index(None, "customer_id", "occurred_at"),)


class ConsentEntry(Base):
    """Append-only: the latest entry per customer, channel and purpose is the current consent."""

    __tablename__ = "consent_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(String(16), default="marketing")
    granted: Mapped[bool] = mapped_column(Boolean)
    occurred_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(64))
    wording_version: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "customer_id", "channel", "purpose", "id"),)


class Counter(Base):
    """Named monotonic counters; incrementing one row serialises the writers that share it."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Lease(Base):
    """A named lock with an expiry: at most one holder ticks a database at a time."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))
    expires_at: Mapped[datetime | None]
