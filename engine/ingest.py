"""Ingestion: bulk upserts of customers, memberships and events, and consent entries, shared by
the API and CSV import.

Each call is one transaction: a batch lands whole or not at all, and batches are independent.
Rows are validated by the pydantic models first; rows that reference unknown customers are
rejected with their index. After writing, the denormalised activity columns of the touched
customers are recomputed set-wise and their `change_seq` is bumped, which is what an incremental
tick reads.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Float,
    cast,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from engine.clock import Clock, utc_naive
from engine.config import valid_timezone
from engine.db import bump_counter, collection_paused
from engine.models import (
    MEMBERSHIP_MIRROR,
    RECENT_VISITS,
    ConsentEntry,
    Customer,
    Event,
    Membership,
    table,
)

__all__ = ["ConsentIn", "CustomerIn", "EventIn", "IngestResult", "Ingestor", "MembershipIn",
           "RowError", "membership_mirror"]

CHUNK = 500
T = TypeVar("T")
VISIT = "visit"
PURCHASE = "purchase"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class CustomerIn(_In):
    """A customer as the club's system knows them."""

    external_id: str = Field(min_length=1, max_length=128)
    first_name: str | None = Field(default=None, max_length=128)
    last_name: str | None = Field(default=None, max_length=128)
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    phone: str | None = Field(default=None, pattern=r"^\+[1-9]\d{6,14}$",
                              description="E.164, e.g. +4915112345678")
    chat_id: str | None = Field(default=None, max_length=64)
    timezone: str | None = None
    locale: str | None = Field(default=None, max_length=16)
    segment: str | None = Field(default=None, max_length=32)
    attributes: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        return None if value is None else valid_timezone(value)

    @field_validator("email", "phone", "chat_id", "first_name", "last_name", "locale", "segment",
                     mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class MembershipIn(_In):
    """One membership term (one cycle)."""

    external_id: str = Field(min_length=1, max_length=128)
    customer_external_id: str = Field(min_length=1, max_length=128)
    plan: str | None = Field(default=None, max_length=64)
    price: float | None = Field(default=None, ge=0)
    starts_on: date
    ends_on: date
    status: str = Field(default="active", pattern=r"^(active|cancelled|ended|frozen)$")

    @field_validator("ends_on")
    @classmethod
    def _ends_after_start(cls, value: date, info: Any) -> date:
        start = info.data.get("starts_on")
        if start is not None and value < start:
            raise ValueError(f"ends_on {value} is before starts_on {start}")
        return value


class EventIn(_In):
    """Something that happened to a customer."""

    external_id: str | None = Field(default=None, max_length=128,
                                    description="makes re-sending the same event harmless")
    customer_external_id: str = Field(min_length=1, max_length=128)
    kind: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    occurred_at: datetime
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return utc_naive(value)


class ConsentIn(_In):
    """A consent given or withdrawn: appended to the consent log, never overwriting."""

    customer_external_id: str = Field(min_length=1, max_length=128)
    channel: str = Field(min_length=1, max_length=32)
    purpose: Literal["marketing", "transactional"] = "marketing"
    granted: bool = Field(strict=True)
    occurred_at: datetime
    source: str = Field(default="api", min_length=1, max_length=64,
                        description="where it was given, e.g. signup_form, front_desk")
    wording_version: str | None = Field(default=None, max_length=64,
                                        description="the version of the text the customer saw")

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return utc_naive(value)


@dataclass
class RowError:
    index: int
    message: str


@dataclass
class IngestResult:
    written: int = 0
    errors: list[RowError] = field(default_factory=list)


def _upsert(conn: Connection, target: Any, key: str, rows: Sequence[dict[str, Any]],
            update_cols: Sequence[str] | None) -> None:
    ins = pg_insert(target) if conn.dialect.name == "postgresql" else sqlite_insert(target)
    if update_cols is None:
        stmt = ins.on_conflict_do_nothing(index_elements=[key])
    else:
        stmt = ins.on_conflict_do_update(
            index_elements=[key], set_={c: ins.excluded[c] for c in update_cols})
    conn.execute(stmt, list(rows))


class Ingestor:
    """Writes batches and keeps the derived customer columns current."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def customers(self, rows: Sequence[CustomerIn]) -> IngestResult:
        now = self.clock.now()
        with collection_paused(), self.engine.begin() as conn:
            seq = bump_counter(conn, "change")
            payload = [{**r.model_dump(), "created_at": now, "updated_at": now, "change_seq": seq,
                        "visit_count": 0, "lifetime_value": 0.0, "recent_visits": []} for r in rows]
            cols = [c for c in CustomerIn.model_fields if c != "external_id"]
            for chunk in _chunks(payload):
                _upsert(conn, table(Customer), "external_id", chunk,
                        [*cols, "updated_at", "change_seq"])
        return IngestResult(written=len(rows))

    def memberships(self, rows: Sequence[MembershipIn]) -> IngestResult:
        now = self.clock.now()
        result = IngestResult()
        with collection_paused(), self.engine.begin() as conn:
            payload = []
            for _, r, cid in _known_customers(conn, rows, result):
                data = r.model_dump(exclude={"customer_external_id"})
                payload.append({**data, "customer_id": cid, "created_at": now, "updated_at": now})
            if result.errors:
                return result
            # a membership moved to another customer leaves its previous owner: their current
            # membership (and its columns on their row) is computed again too
            m = table(Membership)
            owners = {p["customer_id"] for p in payload}
            for chunk in _chunks([p["external_id"] for p in payload]):
                owners.update(conn.execute(
                    select(m.c.customer_id).where(m.c.external_id.in_(chunk))).scalars())
            for chunk in _chunks(payload):
                _upsert(conn, m, "external_id", chunk,
                        ["customer_id", "plan", "price", "starts_on", "ends_on", "status",
                         "updated_at"])
            self._refresh(conn, owners, now, bump_counter(conn, "change"), memberships=True)
        result.written = len(payload)
        return result

    def events(self, rows: Sequence[EventIn]) -> IngestResult:
        now = self.clock.now()
        result = IngestResult()
        with collection_paused(), self.engine.begin() as conn:
            payload: list[dict[str, Any]] = []
            for _, r, cid in _known_customers(conn, rows, result):
                payload.append({"external_id": r.external_id, "customer_id": cid, "kind": r.kind,
                                "occurred_at": r.occurred_at, "received_at": now,
                                "properties": r.properties})
            if result.errors:
                return result
            # The counter first: its row lock orders concurrent event batches, so event ids
            # are handed out in commit order and no batch commits below a tick's event
            # watermark (on PostgreSQL a batch holding lower ids could otherwise commit after
            # a tick had read a later batch's higher ones, and never be read).
            seq = bump_counter(conn, "change")
            keyed = [p for p in payload if p["external_id"] is not None]
            for chunk in _chunks(keyed):
                _upsert(conn, table(Event), "external_id", chunk, None)
            plain = [p for p in payload if p["external_id"] is None]
            for chunk in _chunks(plain):
                conn.execute(table(Event).insert(), chunk)
            self._refresh(conn, {p["customer_id"] for p in payload}, now, seq)
        result.written = len(payload)
        return result

    def consents(self, rows: Sequence[ConsentIn],
                 channels: Collection[str] | None = None) -> IngestResult:
        """Append consent entries; channels outside `channels` (when given) are errors."""
        result = IngestResult()
        with collection_paused(), self.engine.begin() as conn:
            payload: list[dict[str, Any]] = []
            for i, r, cid in _known_customers(conn, rows, result):
                if channels is not None and r.channel not in channels:
                    result.errors.append(RowError(
                        i, f"unknown channel {r.channel!r} (known: {', '.join(sorted(channels))})"))
                else:
                    payload.append({**r.model_dump(exclude={"customer_external_id"}),
                                    "customer_id": cid})
            if result.errors:
                result.errors.sort(key=lambda e: e.index)
                return result
            for chunk in _chunks(payload):
                conn.execute(table(ConsentEntry).insert(), list(chunk))
        result.written = len(payload)
        return result

    def _refresh(self, conn: Connection, customer_ids: Iterable[int], now: datetime,
                 seq: int, *, memberships: bool = False) -> None:
        """Recompute the denormalised activity columns of these customers, set-wise, and mark
        them changed at `seq`; with `memberships` (their memberships changed), their current
        membership and its columns too."""
        ids = sorted(customer_ids)
        if not ids:
            return
        c = table(Customer)
        m = table(Membership)
        e = table(Event)
        current = (select(m.c.id).where(m.c.customer_id == c.c.id)
                   .order_by(m.c.starts_on.desc(), m.c.id.desc()).limit(1).scalar_subquery())
        last_visit = select(func.max(e.c.occurred_at)).where(
            e.c.customer_id == c.c.id, e.c.kind == VISIT).scalar_subquery()
        visits = select(func.count()).where(
            e.c.customer_id == c.c.id, e.c.kind == VISIT).scalar_subquery()
        paid = select(func.coalesce(func.sum(m.c.price), 0.0)).where(
            m.c.customer_id == c.c.id).scalar_subquery()
        bought = select(func.coalesce(func.sum(e.c.properties["amount"].as_float()), 0.0)).where(
            e.c.customer_id == c.c.id, e.c.kind == PURCHASE).scalar_subquery()
        for chunk in _chunks(ids):
            conn.execute(update(c).where(c.c.id.in_(chunk)).values(
                last_visit_at=last_visit, visit_count=visits,
                recent_visits=recent_visits(conn.dialect.name, c.c.id),
                lifetime_value=cast(paid, Float) + cast(bought, Float),
                change_seq=seq, updated_at=now,
                **({"current_membership_id": current} if memberships else {})))
            if memberships:
                # the new current membership's columns: a second statement, as every SET of
                # one reads the row as it was before it
                conn.execute(update(c).where(c.c.id.in_(chunk)).values(**membership_mirror()))


def membership_mirror() -> dict[str, ColumnElement[Any]]:
    """Values for an UPDATE of customers: the columns of the membership each customer's
    `current_membership_id` names (`MEMBERSHIP_MIRROR`; NULL without one)."""
    c, m = table(Customer), table(Membership)
    return {name: select(m.c[column]).where(m.c.id == c.c.current_membership_id)
            .scalar_subquery() for name, column in MEMBERSHIP_MIRROR.items()}


def recent_visits(dialect: str, customer_id: ColumnElement[Any]) -> ColumnElement[Any]:
    """The customer's latest RECENT_VISITS visit instants, newest first, in whole seconds since
    1970 (rounded down), as a JSON array (empty for none): the value of
    `Customer.recent_visits`."""
    e = table(Event)
    latest = (select(e.c.occurred_at).where(e.c.customer_id == customer_id, e.c.kind == VISIT)
              .order_by(e.c.occurred_at.desc()).limit(RECENT_VISITS)
              # the enclosing UPDATE's customer, two levels out
              .correlate_except(e).subquery("latest"))
    if dialect == "postgresql":
        seconds = cast(func.floor(func.extract("epoch", latest.c.occurred_at)), BigInteger)
        ordered = aggregate_order_by(seconds, latest.c.occurred_at.desc())
        return select(func.coalesce(func.json_agg(ordered), literal_column("'[]'::json"))) \
            .scalar_subquery()
    # SQLite aggregates the rows in the order the subquery returns them
    seconds = cast(func.strftime("%s", latest.c.occurred_at), BigInteger)
    return select(func.json_group_array(seconds)).scalar_subquery()


R = TypeVar("R", MembershipIn, EventIn, ConsentIn)


def _known_customers(conn: Connection, rows: Sequence[R],
                     result: IngestResult) -> list[tuple[int, R, int]]:
    """(index, row, customer id) of the rows whose customer exists; an error for each other."""
    ids = _customer_ids(conn, (r.customer_external_id for r in rows))
    known = []
    for i, r in enumerate(rows):
        cid = ids.get(r.customer_external_id)
        if cid is None:
            result.errors.append(RowError(i, f"unknown customer {r.customer_external_id!r}"))
        else:
            known.append((i, r, cid))
    return known


def _customer_ids(conn: Connection, external_ids: Iterable[str]) -> dict[str, int]:
    wanted = sorted(set(external_ids))
    out: dict[str, int] = {}
    for chunk in _chunks(wanted):
        out.update(conn.execute(
            select(Customer.external_id, Customer.id).where(Customer.external_id.in_(chunk))).all())
    return out


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]
