"""Evaluation: one tick evaluates every enabled trigger over the whole base, set-wise in SQL.

A tick, in one transaction:
1. computes every customer's lifecycle stage and records the changes (`engine.lifecycle`);
2. for each trigger, selects the customers for whom it is due (its `when`), in its stages, whose
   conditions hold, and inserts one occurrence per (trigger, customer, re-entry scope) with its
   holdout arm, variant, channel (the contact policy's choice, or its reasons for none) and
   recipient — the unique key makes a second tick, or a second process, a no-op;
3. applies the rest of the contact policy (quiet hours, limits) to the new occurrences, and
   turns the treated ones into outbox messages.

An incremental tick restricts steps 1-2 to customers whose data changed since the previous tick,
read from a temporary copy of their rows made once per tick (the current membership's columns
are on those rows); event and stage-entry triggers always read only what arrived since their
watermark.

A full tick re-reads a date or schedule trigger's due customers only where something may have
changed since the previous full tick evaluated them, if that tick evaluated the same trigger
in the same slot (`_settled`): under the scheduler, full ticks come a minute apart, and a
trigger's slot (a local date, a schedule's firing) lasts a day.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import socket
import time as _time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import (
    BigInteger,
    BindParameter,
    Column,
    ColumnElement,
    CompoundSelect,
    Connection,
    Date,
    DateTime,
    Engine,
    Float,
    FromClause,
    Index,
    Integer,
    Label,
    MetaData,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql import visitors

from engine.assignment import (
    BUCKETS,
    bucket_sql,
    pick_variant_sql,
    salt,
    variant_cutoffs,
)
from engine.clock import Clock, utc_naive
from engine.conditions import Condition
from engine.config import ProjectConfig
from engine.db import (
    WalCheckpointer,
    analyze_if_grown,
    analyze_scratch,
    collection_paused,
    empty_scratch,
    read_counter,
    release_lease,
    take_lease,
)
from engine.drift import Drift
from engine.lifecycle import Lifecycle
from engine.metrics import RowMembership, SqlContext, TickInstants, UnknownName, resolve
from engine.models import (
    Customer,
    Event,
    Message,
    MessageStatus,
    Occurrence,
    OccurrenceStatus,
    RuleFileVersion,
    StageChange,
    Tick,
    TriggerState,
    table,
)
from engine.policy import REFUSED, ContactPolicy
from engine.rulefile import (
    Anchor,
    EventWhen,
    EveryScope,
    RelativeWhen,
    ScheduleWhen,
    Scope,
    StageWhen,
    Trigger,
)
from engine.sqlfn import unindexed, unindexed_anywhere

__all__ = ["Evaluator", "TickBusy", "TickKind", "TickResult", "local_dates"]

TICK_LEASE = "tick"


def _scratch_copy(source: Table, name: str, indexed: Sequence[str] = ()) -> Table:
    """A temporary table with `source`'s columns and key, and an index on each of `indexed`:
    a tick's private copy of some of its rows."""
    return Table(name, MetaData(),
                 *(Column(col.name, col.type, primary_key=col.primary_key, autoincrement=False)
                   for col in source.columns),
                 *(Index(f"ix_{name}_{col}", col) for col in indexed),
                 prefixes=["TEMPORARY"])


# An incremental tick copies the changed customers once, then reads the copy for the stages and
# every date and schedule trigger: a scan of a few thousand compact rows per trigger instead of
# an index probe and two row lookups per customer. Their current memberships are read from the
# same rows (`RowMembership`: the columns ingestion keeps there); a date trigger reads the copy
# through its anchor date's index: the few changed customers due today, not all.
CHANGED_CUSTOMERS = _scratch_copy(
    table(Customer), "tick_changed_customers",
    indexed=("membership_starts_on", "membership_ends_on"))
# On PostgreSQL the copy is analysed once filled (autovacuum never visits temporary tables), on
# the columns the triggers' joins and filters select by. Without statistics the planner
# multiplied default selectivities down to one customer and joined a copy of the memberships
# by a scan per customer: 0.27 s for one trigger at 10,000 changed customers. All the columns
# took 70 ms to analyse, these seven 20-40 ms.
ANALYZED_COLUMNS = ("id", "stage", "timezone", "membership_plan", "membership_status",
                    "membership_starts_on", "membership_ends_on")


class TickKind(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class TickBusy(RuntimeError):
    """Another process holds the tick lease of this database."""


class LoadedTriggerLike(Protocol):
    trigger: Trigger
    conditions: list[Condition]
    path: str
    sha256: str


@dataclass
class TickResult:
    """What one tick did."""

    tick_id: int
    kind: TickKind
    now: datetime
    dry_run: bool
    stage_changes: int = 0
    occurrences: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    held_out: int = 0
    skipped: int = 0
    deferred: int = 0  # messages the contact policy put off to after quiet hours
    stopped: dict[str, int] = field(default_factory=dict)  # policy step -> occurrences skipped
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"tick_id": self.tick_id, "kind": str(self.kind), "now": self.now.isoformat(),
                "dry_run": self.dry_run, "stage_changes": self.stage_changes,
                "occurrences": self.occurrences, "messages": self.messages,
                "held_out": self.held_out, "skipped": self.skipped,
                "deferred": self.deferred, "stopped": self.stopped,
                "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class LocalDay:
    """Local calendar facts of one time zone at the tick's instant."""

    tz: str
    today: date
    local_now: datetime


@dataclass(frozen=True)
class _Assigned:
    """What the occurrence INSERT of one trigger writes besides the candidates' own columns."""

    arm: ColumnElement[Any]
    variant: ColumnElement[Any]
    channel: ColumnElement[Any]
    anchors: tuple[Any, ...]  # the objects whose ids key the entry, kept alive with it


@dataclass(frozen=True)
class _Settled:
    """Where a full tick re-reads only some of a trigger's due customers: the zones whose slot
    the previous full tick already evaluated, and the ids of the customers to read there."""

    zones: frozenset[str]
    ids: CompoundSelect[Any]


def local_dates(zones: Iterable[str], now: datetime) -> list[LocalDay]:
    """For each time zone, the local date and time at the UTC instant `now`."""
    out = []
    aware = now.replace(tzinfo=ZoneInfo("UTC"))
    for tz in sorted(set(zones)):
        local = aware.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
        out.append(LocalDay(tz, local.date(), local))
    return out


def insert_ignore(conn: Connection, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the connection's dialect."""
    return _insert_ignore(conn.dialect.name, table)


@functools.lru_cache(maxsize=64)
def _insert_ignore(dialect: str, table: Any) -> Any:
    # Built once per table: a new dialect-specific INSERT works out its dialect options on
    # first use (0.2 ms), and a tick builds one per trigger. Statements derived from it
    # (`from_select`, `values`) are new objects; this one is never changed.
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing()
    return sqlite_insert(table).on_conflict_do_nothing()


class Evaluator:
    """Runs ticks for one rule set over one database."""

    def __init__(self, engine: Engine, config: ProjectConfig, triggers: Sequence[LoadedTriggerLike],
                 clock: Clock, *, files: dict[str, tuple[str, str]] | None = None,
                 holder: str | None = None, policy: bool = True, settle: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.triggers = [t for t in triggers if t.trigger.enabled]
        self.clock = clock
        self.files = files or {}
        self.lifecycle = Lifecycle(config.lifecycle)
        self.default_tz = config.club.timezone
        self._stages_key = f"{self.lifecycle.fingerprint}:{self.default_tz}"
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.contact = {name: ch.contact for name, ch in config.channels.channels.items()}
        # the customer columns holding contact points: read with every candidate
        self._contact_columns = sorted(set(self.contact.values()))
        # the contact policy (config/policy.yaml); off only to measure or test without it
        self.policy = ContactPolicy(config.policy, self.contact,
                                    [t.trigger for t in self.triggers]) if policy else None
        self._outbox_statements: dict[bool, Any] = {}  # policy on/off -> the outbox INSERT
        self._assignments: dict[tuple[Any, ...], _Assigned] = {}  # see _assignment
        # customers (or the copy) -> the membership on their rows
        self._aliases: dict[str, RowMembership] = {}
        # the tick's instant in the statements, read when they run (`_context` sets it)
        self._instants = TickInstants()
        # the occurrence INSERTs kept from tick to tick, by shape, least recently run first
        # (`_fire`)
        self._inserts: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        # an incremental tick's copy of the changed customers, through the change_seq index
        c = table(Customer)
        self._copy = insert(CHANGED_CUSTOMERS).from_select(
            [col.name for col in c.columns],
            select(*c.columns).where(c.c.change_seq > bindparam("copy_since", type_=BigInteger())))
        # the time-dependent names of the date and schedule triggers' conditions; without them
        # (`settle` off: only to measure or test without it) every full tick reads every due
        # customer
        self._drifts = {t.trigger.id: Drift.of(c.text for c in t.conditions)
                        for t in self.triggers
                        if settle and isinstance(t.trigger.when, RelativeWhen | ScheduleWhen)}
        # what a full tick records of each of those triggers, to know it again (`_settled`):
        # its definition, and the club's (the types of the attributes its conditions read)
        club = config.club.model_dump_json()
        self._fingerprints = {
            t.trigger.id: hashlib.sha256((t.trigger.model_dump_json() + club).encode())
            .hexdigest()[:16] for t in self.triggers if t.trigger.id in self._drifts}
        self._then: dict[str, LocalDay] = {}  # the previous full tick's local days, per zone
        # SQLite's write-ahead log, checkpointed after each committed tick rather than in its commit
        self.checkpoints = WalCheckpointer(engine) if WalCheckpointer.applies(engine) else None

    # the tick ----------------------------------------------------------------------------------

    def tick(self, *, kind: TickKind = TickKind.FULL, dry_run: bool = False,
             now: datetime | None = None,
             lease_ttl: timedelta = timedelta(minutes=10)) -> TickResult:
        """Evaluate every enabled trigger once. Raises TickBusy if another process is ticking."""
        now = utc_naive(now or self.clock.now())
        started = _time.perf_counter()
        # SQLite: the commits of the lease and the tick leave the write-ahead log to the
        # checkpointer; the garbage collector waits for the commit
        with collection_paused(), self.engine.connect() as conn, (
                self.checkpoints.quiet(conn) if self.checkpoints else contextlib.nullcontext()):
            with conn.begin():
                if not take_lease(conn, TICK_LEASE, self.holder, self.clock.now(), lease_ttl):
                    raise TickBusy("another process is ticking this database")
            try:
                trans = conn.begin()
                try:
                    result = self._tick(conn, kind, dry_run, now)
                except BaseException:
                    trans.rollback()
                    raise
                if dry_run:
                    trans.rollback()
                else:
                    trans.commit()
            finally:
                if conn.in_transaction():  # a commit that failed
                    conn.rollback()
                with conn.begin():
                    release_lease(conn, TICK_LEASE, self.holder)
        result.seconds = _time.perf_counter() - started
        if self.checkpoints and not dry_run:
            self.checkpoints.request()
        return result

    def preview(self, trigger_id: str, *, sample: int = 10,
                now: datetime | None = None) -> dict[str, Any]:
        """Who the trigger would fire for if a tick ran now, and who matches its stage and
        conditions regardless of `when`; nothing is written."""
        now = utc_naive(now or self.clock.now())
        selected = [t for t in self.triggers if t.trigger.id == trigger_id]
        if not selected:
            raise LookupError(f"unknown or disabled trigger {trigger_id!r}")
        loaded = selected[0]
        evaluator = Evaluator(self.engine, self.config, selected, self.clock, files=self.files,
                              holder=self.holder)
        with self.engine.connect() as conn:
            trans = conn.begin()
            try:
                result = evaluator._tick(conn, TickKind.FULL, True, now)
                o = Occurrence.__table__
                c = Customer.__table__
                rows = conn.execute(
                    select(c.c.external_id, o.c.arm, o.c.variant, o.c.channel, o.c.status)
                    .select_from(o.join(c, c.c.id == o.c.customer_id))
                    .where(o.c.tick_id == result.tick_id).order_by(o.c.id).limit(sample)
                ).mappings().all()
                ctx, base = evaluator._context(now)
                audience = base.add_columns(func.count()).where(
                    *([c.c.stage.in_(loaded.trigger.stages)] if loaded.trigger.stages else []),
                    *(cond.sql(ctx) for cond in loaded.conditions))
                matching = int(conn.execute(audience).scalar_one())
            finally:
                trans.rollback()
        return {"trigger": trigger_id, "now": now.isoformat(),
                "would_fire": result.occurrences.get(trigger_id, 0),
                "would_send": result.messages, "held_out": result.held_out,
                "skipped": result.skipped, "matching_conditions": matching,
                "sample": [dict(r) for r in rows]}

    def _local_days(self, conn: Connection, now: datetime) -> None:
        """The customers' time zones and each zone's local date and time at `now`."""
        self._zones = {self.default_tz, *_zones(conn)}
        self._days = local_dates(self._zones, now)

    def _context(self, now: datetime, *,
                 customers: Table | None = None) -> tuple[SqlContext, Select[Any]]:
        """The evaluation context and the base FROM: the customers table or the incremental
        tick's copy of some of its rows, their current membership read from the columns on
        their rows (`RowMembership`: no membership row looked up per customer)."""
        c = table(Customer) if customers is None else customers
        self._instants.now = now  # what the statements built over this context read
        # one per source for the evaluator's life: expressions built over its columns are
        # reused from tick to tick (`_assignment`)
        if c.name not in self._aliases:
            self._aliases[c.name] = RowMembership(c)
        m = self._aliases[c.name]
        # Each customer's local date as an expression, not a join: at any instant the zones share
        # two or three dates, so this is a CASE over a few zone lists, or one constant.
        local_today = self._by_zone({d.tz: d.today for d in self._days}, Date(), customers=c)
        ctx = SqlContext(customer=c, membership=m, local_today=local_today,
                         instants=self._instants)
        return ctx, select().select_from(c)

    def _copy_changed(self, conn: Connection, previous_seq: int) -> None:
        """Fill CHANGED_CUSTOMERS with the customers changed since `previous_seq`."""
        empty_scratch(conn, CHANGED_CUSTOMERS)
        conn.execute(self._copy, {"copy_since": previous_seq})
        analyze_scratch(conn, CHANGED_CUSTOMERS, ANALYZED_COLUMNS)

    def _in_zones(self, zones: Collection[str], *, customers: FromClause | None = None,
                  indexed: bool = True) -> ColumnElement[bool]:
        """The customer's time zone (or the club's, if they have none) is one of `zones`."""
        c = table(Customer) if customers is None else customers
        if set(self._zones) <= set(zones):
            return true()
        tz: ColumnElement[Any] = c.c.timezone if indexed else unindexed(c.c.timezone)
        named = tz.in_(sorted(zones))
        # Written on the bare column so that the timezone index can serve it.
        return or_(tz.is_(None), named) if self.default_tz in zones else named

    def _by_zone(self, values: dict[str, Any], type_: Any, *,
                 customers: FromClause | None = None) -> ColumnElement[Any]:
        """A per-customer value chosen by time zone from {zone: value}; customers in other zones
        get one of the values (callers filter them out)."""
        groups: dict[Any, list[str]] = {}
        for tz, value in values.items():
            groups.setdefault(value, []).append(tz)
        # The group with the club's zone (most customers) is the ELSE branch.
        ordered = sorted(groups.items(), key=lambda g: (self.default_tz in g[1], len(g[1])))
        *whens, (last, _) = ordered
        if not whens:
            return literal(last, type_)
        return case(*((self._in_zones(zones, customers=customers), literal(value, type_))
                      for value, zones in whens),
                    else_=literal(last, type_))

    def _tick(self, conn: Connection, kind: TickKind, dry_run: bool, now: datetime) -> TickResult:
        # The previous tick: the change counter and the newest event id it read. Every event
        # after that id was ingested with a customer change after that count: ingestion takes
        # the counter before it inserts events, and the tick reads the counter first.
        previous = conn.execute(
            select(Tick.change_seq, Tick.summary).where(Tick.dry_run.is_(False))
            .order_by(Tick.id.desc()).limit(1)).first()
        previous_seq = previous.change_seq if previous is not None else 0
        previous_events = ((previous.summary or {}).get("event_max")
                           if previous is not None else None)
        change_seq = read_counter(conn, "change")
        tick_id = int(conn.execute(
            insert(Tick).values(kind=str(kind), now=now, started_at=self.clock.now(),
                                change_seq=change_seq, dry_run=dry_run)
            .returning(Tick.id)).scalar_one())
        result = TickResult(tick_id, kind, now, dry_run)
        versions = self._rule_file_versions(conn, now)

        self._local_days(conn, now)
        params = ({} if self.policy is None
                  else self.policy.params(tick_id, now, self._zones, self.default_tz))
        ctx, everyone = self._context(now)  # the triggers', and a full tick's stages
        changed: SqlContext | None = None
        previous_full: Row[Any] | None = None
        # before the copy, so that the customers of every event up to it are in the copy
        event_max = conn.execute(select(func.max(Event.id))).scalar() or 0
        if kind is TickKind.INCREMENTAL:
            self._copy_changed(conn, previous_seq)
            changed, base = self._context(now, customers=CHANGED_CUSTOMERS)
            result.stage_changes = self.lifecycle.record_changes(
                conn, base, changed, tick_id, now, copy=CHANGED_CUSTOMERS)
        else:
            previous_full = self._previous_full(conn)
            self._then = ({d.tz: d for d in local_dates(self._zones, previous_full.now)}
                          if previous_full is not None else {})
            restaged = self._restaged(previous_full, now, previous_seq)
            base = everyone if restaged is None else everyone.where(
                ctx.customer.c.id.in_(restaged))
            result.stage_changes = self.lifecycle.record_changes(conn, base, ctx, tick_id, now)

        stage_max = conn.execute(select(func.max(StageChange.id))).scalar() or 0
        states = {row.trigger_id: row for row in conn.execute(select(TriggerState.__table__))}
        saved: list[tuple[str, bool, int | None, str, int]] = []
        for loaded in self.triggers:
            trig = loaded.trigger
            state = states.get(trig.id)
            event_wm = state.event_watermark if state else 0
            stage_wm = state.stage_watermark if state else 0
            # an event trigger read up to the previous tick finds every customer of its new
            # events among the changed ones
            caught_up = previous_events is not None and event_wm >= previous_events
            reads = ctx
            if changed is not None and (isinstance(trig.when, RelativeWhen | ScheduleWhen)
                                        or isinstance(trig.when, EventWhen) and caught_up):
                reads = changed
            count = self._fire(conn, loaded, reads, (event_wm, event_max),
                               (stage_wm, stage_max), self._settled(loaded, previous_full, now),
                               versions.get(loaded.path),
                               {**params, "this_tick": tick_id, "events_after": event_wm,
                                "events_upto": event_max, "stages_after": stage_wm,
                                "stages_upto": stage_max})
            result.occurrences[trig.id] = count
            saved.append((trig.id, state is not None, versions.get(loaded.path), loaded.path,
                          count))
        self._save_states(conn, saved, event_max, stage_max, now)
        if any(result.occurrences.values()):
            if self.policy is not None:
                report = self.policy.apply(conn, params, now, self._zones, self._in_zones,
                                           self._by_zone)
                result.deferred = report.deferred
                result.stopped = report.skipped
            result.held_out, result.skipped, result.messages, refused = self._to_outbox(
                conn, tick_id, now)
            if self.policy is not None and refused:
                # written skipped without a channel by the INSERTs' `decision_sql`
                result.stopped = {"channel": refused, **result.stopped}
            # a first tick over a new base writes most of these tables' rows: the next statements
            # (and ticks, before autovacuum) must not be planned for empty tables. Only when the
            # tick at least doubled them: ordinary growth is autovacuum's.
            analyze_if_grown(conn, table(Occurrence).name, sum(result.occurrences.values()),
                             also=(table(Message).name,), share=1.0)
        # a full tick's evaluation, for the next full tick's `_settled`
        evaluated = ({"stage_max": stage_max, "triggers": self._fingerprints}
                     if kind is TickKind.FULL else {})
        conn.execute(update(Tick).where(Tick.id == tick_id).values(
            finished_at=self.clock.now(),
            summary={**result.as_dict(), "stages": self._stages_key, "event_max": event_max,
                     **evaluated}))
        return result

    @staticmethod
    def _previous_full(conn: Connection) -> Row[Any] | None:
        """The instant, summary and change count of the previous full tick, if any."""
        return conn.execute(
            select(Tick.now, Tick.summary, Tick.change_seq)
            .where(Tick.kind == str(TickKind.FULL), Tick.dry_run.is_(False),
                   Tick.finished_at.is_not(None))
            .order_by(Tick.id.desc()).limit(1)).first()

    def _restaged(self, previous: Row[Any] | None, now: datetime,
                  previous_seq: int) -> Select[Any] | None:
        """The customers whose stage may have changed since the previous full tick (None: all).

        Valid only if that tick computed stages with the same definition and default zone.
        Customers changed since that tick are all recomputed, even those an incremental tick
        has seen since: it computed their stage at its own instant, not at the full tick's."""
        if previous is None or (previous.summary or {}).get("stages") != self._stages_key:
            return None
        return self.lifecycle.may_have_changed(previous.now, now, self._zones,
                                               min(previous.change_seq, previous_seq))

    def _settled(self, loaded: LoadedTriggerLike, previous: Row[Any] | None,
                 now: datetime) -> _Settled | None:
        """Where the previous full tick already evaluated this date or schedule trigger for the
        slot it is due in now, the customers whose evaluation may differ since (None: read
        every due customer).

        A customer the previous full tick passed over in the same slot (not due there, not in
        the trigger's stages, conditions false, or fired for already in the scope) is passed
        over again unless their data changed since that tick (every ingestion bumps
        `change_seq`), their stage changed, time moved a count in the trigger's conditions
        (`engine.drift`), or an occurrence of an `every: N` trigger left its window. Valid
        only if that tick evaluated the same definition of the trigger, with the same stages,
        at an instant not after this one."""
        trig = loaded.trigger
        when = trig.when
        drift = self._drifts.get(trig.id)
        if previous is None or drift is None or previous.now > now:
            return None
        summary = previous.summary or {}
        stage_max = summary.get("stage_max")
        if (summary.get("stages") != self._stages_key or stage_max is None
                or (summary.get("triggers") or {}).get(trig.id) != self._fingerprints[trig.id]):
            return None
        assert isinstance(when, RelativeWhen | ScheduleWhen)
        zones = frozenset(d.tz for d in self._days
                          if (slot := _slot(when, d)) is not None
                          and slot == _slot(when, self._then[d.tz]))
        moved = drift.moved(previous.now, now, self._zones) if zones else None
        if moved is None:
            return None
        c, sh, o, t = table(Customer), table(StageChange), table(Occurrence), table(Tick)
        parts = [select(c.c.id).where(c.c.change_seq > previous.change_seq),
                 select(sh.c.customer_id).where(sh.c.id > stage_max), *moved]
        if isinstance(trig.once, EveryScope):
            # an occurrence fired at its tick's instant: those fired N days before the interval
            # between the two ticks, through the ticks of those instants (not through the
            # trigger's key: every occurrence it ever fired)
            every = trig.once.every
            parts.append(select(o.c.customer_id).where(
                unindexed(o.c.trigger_id) == trig.id,
                o.c.tick_id.in_(select(t.c.id).where(t.c.now > previous.now - every,
                                                     t.c.now <= now - every))))
        return _Settled(zones, union_all(*parts))

    # candidates --------------------------------------------------------------------------------

    def _fire(self, conn: Connection, loaded: LoadedTriggerLike, ctx: SqlContext,
              events: tuple[int, int], stages: tuple[int, int], settled: _Settled | None,
              version_id: int | None, params: dict[str, Any]) -> int:
        """Insert the trigger's occurrences of this tick; how many.

        The INSERT is built once per shape and kept: the tick's instant, id and watermarks are
        bound when it runs (`TickInstants`, `params`), and the shape is what else it is built
        from (`_shape`). Building one took 2-4 ms of Python, a large share of an incremental
        tick of twenty triggers; the statement kept, SQLAlchemy also keeps its cache key."""
        key = self._shape(loaded, ctx, events, stages, settled, version_id)
        if key is not None and key in self._inserts:
            self._inserts.move_to_end(key)
            stmt = self._inserts[key]
        else:
            stmt = self._insert_occurrences(
                conn, loaded, self._candidates(loaded, ctx, events, stages, settled=settled),
                version_id)
            if key is not None and _bound_in_full(stmt):
                self._inserts[key] = stmt
                if len(self._inserts) > 4 * len(self.triggers) + 8:
                    self._inserts.popitem(last=False)
        if stmt is None:
            return 0
        return int(conn.execute(stmt, params).rowcount)

    def _shape(self, loaded: LoadedTriggerLike, ctx: SqlContext, events: tuple[int, int],
               stages: tuple[int, int], settled: _Settled | None,
               version_id: int | None) -> tuple[Any, ...] | None:
        """What the trigger's occurrence INSERT is built from besides the tick's bound values:
        the customer rows it reads, its rule file's version, each zone's local date (the
        conditions' day counts) and the trigger's slot there (date and schedule triggers:
        their anchor dates and slots), whether any event or stage change is new (event and
        stage-entry triggers) and whether the trigger reads its first events. None: not kept
        (a settled slot's reads depend on the previous full tick)."""
        if settled is not None:
            return None
        when = loaded.trigger.when
        if isinstance(when, EventWhen):
            moment: tuple[Any, ...] = (events[1] > events[0], events[0] == 0)
        elif isinstance(when, StageWhen):
            moment = (stages[1] > stages[0],)
        else:
            moment = tuple(_slot(when, d) for d in self._days)
        return (loaded.trigger.id, id(ctx.customer), version_id,
                tuple((d.tz, d.today) for d in self._days), moment)

    def _candidates(self, loaded: LoadedTriggerLike, ctx: SqlContext,
                    events: tuple[int, int], stages: tuple[int, int], *,
                    settled: _Settled | None = None) -> tuple[Select[Any], FromClause] | None:
        """customer_id, membership_id, event_id, scope_key of everyone the trigger fires for,
        and the customer rows it reads (those of `ctx`: the table, or the incremental tick's
        copy of the changed customers).

        Event and stage-entry triggers read what arrived since their watermarks (bound as
        `events_after`/`events_upto`, `stages_after`/`stages_upto`). In a full tick, `settled`
        restricts a date or schedule trigger to the customers whose evaluation may have changed
        since the previous one, in the zones that tick evaluated in this slot."""
        trig = loaded.trigger
        when = trig.when
        c, m, days = ctx.customer, ctx.membership, self._days
        joined: FromClause = c
        # The read is driven by one indexed term: the customers to re-read in a settled slot,
        # the anchor date (date triggers), the range of a day count, or else the stage and time
        # zone (schedule triggers). The other terms are written so that SQLite's planner, which
        # has no statistics, does not pick them instead.
        fresh: set[str] = set()
        if settled is not None:
            assert isinstance(when, RelativeWhen | ScheduleWhen)
            fresh = {d.tz for d in days if _slot(when, d) is not None} - settled.zones
        by_ids = settled is not None and not fresh
        ranges = self._day_count_ranges(loaded, c, indexed=not by_ids)
        stage_drives = isinstance(when, ScheduleWhen) and not ranges and not by_ids
        event_id: ColumnElement[Any] = cast(null(), BigInteger)
        slot: ColumnElement[Any]
        filters: list[ColumnElement[Any]] = []
        if isinstance(when, EventWhen):
            lo, hi = events
            if hi <= lo:
                return None
            e = Event.__table__
            # Once the trigger has a watermark, read through (kind, id): the events since then.
            # Left indexable, the time window tempts SQLite into a skip scan of (customer_id,
            # kind, occurred_at) over the whole base (4 s at a million customers for 100 new
            # events), and PostgreSQL, whose statistics end before the newest events, into
            # reading every event of the window for the new ones (120,000 for 10,000: 39 ms
            # against 2-4 ms through the key). At the trigger's first tick the window is the
            # selective term: read through (kind, occurred_at, customer_id), not through every
            # event of the kind by id (5-18 s at a million customers for a trigger on visits).
            first = lo == 0
            occurred = e.c.occurred_at if first else unindexed_anywhere(e.c.occurred_at)
            event_key = unindexed(e.c.id) if first else e.c.id
            ev_filter = and_(e.c.kind == when.event,
                             event_key > bindparam("events_after", type_=BigInteger()),
                             event_key <= bindparam("events_upto", type_=BigInteger()),
                             occurred > self._instants.at(-when.within),
                             occurred <= self._instants.at())
            if trig.once == Scope.PER_EVENT:
                ev = select(e.c.customer_id, e.c.id.label("event_id"), e.c.occurred_at) \
                    .where(ev_filter).subquery("ev")
            else:
                ev = select(e.c.customer_id, func.min(e.c.id).label("event_id"),
                            func.min(e.c.occurred_at).label("occurred_at")) \
                    .where(ev_filter).group_by(e.c.customer_id).subquery("ev")
            joined = ev.join(c, c.c.id == ev.c.customer_id)
            event_id = ev.c.event_id
            slot = cast(ev.c.event_id, String)
        elif isinstance(when, StageWhen):
            lo, hi = stages
            if hi <= lo:
                return None
            sh = StageChange.__table__
            entered = select(sh.c.customer_id, func.max(sh.c.id).label("change_id")).where(
                sh.c.stage == when.stage_entered,
                sh.c.id > bindparam("stages_after", type_=BigInteger()),
                sh.c.id <= bindparam("stages_upto", type_=BigInteger()),
            ).group_by(sh.c.customer_id).subquery("entered")
            joined = entered.join(c, c.c.id == entered.c.customer_id)
            filters.append(c.c.stage == when.stage_entered)
            slot = cast(entered.c.change_id, String)
        elif isinstance(when, RelativeWhen):
            # Due where the anchor date is today's firing date (yesterday's before `at`) minus
            # the offset, in the customer's zone; read through the index of the anchor date on
            # the customer rows. Customers without a membership have none: the term below drops
            # them.
            zones_by_anchor: dict[date, list[str]] = {}
            fire_dates: dict[date, date] = {}
            for d in days:
                fire_date = _fire_date(when, d)
                anchor = fire_date - timedelta(days=when.offset_days)
                zones_by_anchor.setdefault(anchor, []).append(d.tz)
                fire_dates[anchor] = fire_date
            anchor_col: ColumnElement[Any] = (
                m.c.ends_on if when.anchor is Anchor.MEMBERSHIP_ENDS else m.c.starts_on)
            if c is table(Customer) and not by_ids:
                # the anchor dates as one list, for the anchor's index (the copies' small
                # indexes serve each anchor of the term below: SQLite reads them as a
                # multi-index OR; PostgreSQL would count this term twice against it, expecting
                # a single row and planning a loop over the changed customers for each)
                filters.append(anchor_col.in_(sorted(zones_by_anchor)))
            # read by the ids to re-read in a settled slot: through the anchor's index, SQLite
            # would probe the customers of each anchor for every id of the list
            anchor_term = unindexed(anchor_col) if by_ids else anchor_col
            filters.append(or_(*(
                and_(anchor_term == anchor, self._in_zones(zones, customers=c, indexed=False))
                for anchor, zones in zones_by_anchor.items())))
            if len(fire_dates) == 1:
                slot = literal(next(iter(fire_dates.values())).isoformat())
            else:
                slot = case(*((anchor_col == anchor, literal(fire.isoformat()))
                              for anchor, fire in fire_dates.items()))
        elif isinstance(when, ScheduleWhen):
            slots = {d.tz: s for d in days if (s := _latest_slot(when.schedule, d)) is not None}
            if not slots:
                return None
            filters.append(self._in_zones(slots, customers=c, indexed=stage_drives))
            slot = self._by_zone(slots, String(32), customers=c)
        if settled is not None:
            # fresh zones (the slot began since the previous full tick) are read in full
            inside = c.c.id.in_(settled.ids)
            filters.append(or_(self._in_zones(fresh, customers=c, indexed=False), inside)
                           if fresh else inside)

        if trig.stages:
            filters.append((c.c.stage if stage_drives else unindexed(c.c.stage))
                           .in_(trig.stages))
        filters.extend(ranges)
        once = trig.once
        o = Occurrence.__table__
        # the current membership's id, on the customer row with its columns (ingestion keeps
        # them, and never deletes a membership)
        membership_id = m.c.id
        if once == Scope.PER_CYCLE:
            scope = literal("cycle:") + cast(func.coalesce(membership_id, 0), String)
        elif once == Scope.EVER:
            scope = literal("ever")
        elif once == Scope.PER_EVENT:
            scope = literal("slot:") + slot
        else:
            assert isinstance(once, EveryScope)
            scope = literal("at:") + slot
            # through the unique key (trigger, customer): the trigger's few occurrences of the
            # customer, not every trigger's occurrences of them inside the window. A probe per
            # customer (a scalar subquery): PostgreSQL turned NOT EXISTS into a hash anti-join
            # over a pass of every occurrence, which grows with the club's history.
            filters.append(select(o.c.id).where(
                o.c.trigger_id == trig.id, o.c.customer_id == c.c.id,
                unindexed(o.c.fired_at) > self._instants.at(-once.every))
                .limit(1).scalar_subquery().is_(None))
        if isinstance(when, RelativeWhen | ScheduleWhen) and not isinstance(once, EveryScope):
            # Every full tick reads a date or schedule trigger's whole day of due customers
            # again (every minute, under the scheduler): those it has already fired for in
            # this scope are passed over by one probe of the unique key, before their
            # conditions, channel and contact policy are worked out only for the INSERT to
            # drop the row as a duplicate. A probe per customer (a scalar subquery, which
            # PostgreSQL runs as such): as NOT EXISTS, PostgreSQL joined the trigger's
            # occurrences of the scope, estimated at one row for a new slot, in a loop over
            # every customer (6 s at a million customers for 9,000 of them).
            filters.append(select(o.c.id).where(
                o.c.trigger_id == trig.id, o.c.customer_id == c.c.id, o.c.scope_key == scope)
                .limit(1).scalar_subquery().is_(None))
        # The conditions last: SQLite tests the terms in the order written, and a windowed
        # count is a subquery per customer, not worth running for one fired a week ago.
        filters.extend(cond.sql(ctx) for cond in loaded.conditions)
        return select(
            c.c.id.label("customer_id"), membership_id.label("membership_id"),
            event_id.label("event_id"), scope.label("scope_key"), c.c.stage.label("stage"),
            *(c.c[column] for column in self._contact_columns),
        ).select_from(joined).where(*filters), c

    def _day_count_ranges(self, loaded: LoadedTriggerLike, c: FromClause, *,
                          indexed: bool = True) -> list[ColumnElement[bool]]:
        """For each condition `<whole days since a customer timestamp> == k`, a range of that
        timestamp holding every customer for whom it can be true. The condition stays as it
        is; the range lets the database read the timestamp's index instead of computing the
        day count for every customer in the trigger's stages (`days_since_last_visit == 10`:
        one day of last visits instead of half the base)."""
        out: list[ColumnElement[bool]] = []
        for cond in loaded.conditions:
            found = _day_count_equals(cond.text)
            if found is None:
                continue
            name, k = found
            column: ColumnElement[Any] = c.c[name] if indexed else unindexed(c.c[name])
            # k whole days (truncated, to the second) since t: now - (k+1) days < t <= now - k
            # days, within a second; 0 days also covers up to a day ahead (truncation to 0).
            high = timedelta(days=-k) if k else timedelta(days=1)
            out.append(column.between(self._instants.at(timedelta(days=-(k + 1))),
                                      self._instants.at(high + timedelta(seconds=1))))
        return out

    def _insert_occurrences(self, conn: Connection, loaded: LoadedTriggerLike,
                            found: tuple[Select[Any], FromClause] | None,
                            version_id: int | None) -> Any:
        """The INSERT of one occurrence per candidate not already recorded (None: no
        candidates), with its arm, variant, channel and status decided in the same statement:
        with the contact policy, the channel is the policy's choice (consent, segment, quiet
        hours) and a candidate no channel can take is skipped with each channel's reason. The
        tick's id is bound as `this_tick`."""
        if found is None:
            return None
        candidates, customers = found
        trig = loaded.trigger
        # The assignment is written over the candidates' own expressions, in the SELECT that
        # reads them: no subquery layers between for the database to flatten.
        cols: dict[str, ColumnElement[Any]] = {
            col.name: col.element if isinstance(col, Label) else col
            for col in candidates.selected_columns}
        assigned = self._assignment(trig, cols, customers)
        # Status, reason and recipient are read over a subquery of arm and channel, so that
        # neither is computed again for them: the channel's expression holds, with the contact
        # policy, a consent probe per channel, and the arm a hash (neither database shares a
        # repeated expression). Its OFFSET keeps both databases from merging it into the outer
        # SELECT, which would copy the expressions back. With the recipient written here, the
        # outbox INSERT reads the tick's occurrences alone, not every messaged customer again.
        fired = candidates.with_only_columns(
            cols["customer_id"].label("customer_id"), cols["scope_key"].label("scope_key"),
            cols["membership_id"].label("membership_id"), cols["event_id"].label("event_id"),
            cols["stage"].label("stage"), assigned.arm.label("arm"),
            assigned.variant.label("variant"), assigned.channel.label("channel"),
            *(cols[column].label(column) for column in self._contact_columns),
        ).offset(0).subquery("fired")
        channel, status, reason, recipient = self._decision(trig, fired)
        stmt = insert_ignore(conn, Occurrence.__table__).from_select(
            ["trigger_id", "customer_id", "scope_key", "membership_id", "event_id",
             "rule_file_version_id", "tick_id", "fired_at", "stage", "arm", "variant", "channel",
             "status", "reason", "recipient"],
            select(
                literal(trig.id).label("trigger_id"), fired.c.customer_id, fired.c.scope_key,
                fired.c.membership_id, fired.c.event_id,
                literal(version_id, BigInteger).label("rule_file_version_id"),
                bindparam("this_tick", type_=Integer()).label("tick_id"),
                self._instants.at().label("fired_at"),
                fired.c.stage, fired.c.arm, fired.c.variant, channel.label("channel"),
                status.label("status"), reason.label("reason"), recipient.label("recipient"))
            # SQLite needs a WHERE to read ON CONFLICT after INSERT ... SELECT unambiguously.
            .where(true()),
        )
        return stmt

    # arm, variant, channel; the outbox -----------------------------------------------------------

    def _assignment(self, trig: Trigger, cols: dict[str, ColumnElement[Any]],
                    customers: FromClause) -> _Assigned:
        """Arm, variant and channel of the trigger's occurrences, as expressions
        over the candidates' columns; built once per trigger, contact policy (or none) and source
        of customer rows, not per tick: the columns are those of that source and of its one
        `RowMembership` (`_context`), the same objects every tick."""
        key = (id(self.policy), trig.id, id(customers))
        built = self._assignments.get(key)
        if built is not None:
            return built
        arm, variant = self._arm_and_variant(trig, cols)
        channel = self._channel(trig, {**cols, "variant": variant})
        if self.policy is not None:
            # The policy's choice, or the reasons none can take it (`_decision` reads them).
            # Held-out occurrences keep the channel a contact point allows (never sent).
            chosen = self.policy.decision_sql(trig, customers, variant, cols["customer_id"])
            channel = chosen if arm is None else case((arm == "holdout", channel), else_=chosen)
        # the key's objects are kept with the entry, so that their ids are not reused
        assigned = _Assigned(literal("treatment") if arm is None else arm, variant, channel,
                             (self.policy, customers))
        self._assignments[key] = assigned
        return assigned

    def _decision(self, trig: Trigger, fired: FromClause) -> tuple[ColumnElement[Any], ...]:
        """Channel, status, reason and recipient of the trigger's occurrences over the columns
        of `fired` (their arm, channel and contact points): held out, skipped for want of a
        channel (with the contact policy, the policy's reasons for each channel), or a message
        to the chosen channel's contact point."""
        whens: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = []
        reasons: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = []
        channel: ColumnElement[Any] = fired.c.channel
        if trig.holdout > 0:
            held = fired.c.arm == "holdout"
            whens.append((held, literal(str(OccurrenceStatus.HELD_OUT))))
            reasons.append((held, literal("holdout")))
        if self.policy is None:
            missing = fired.c.channel.is_(None)
            whens.append((missing, literal(str(OccurrenceStatus.SKIPPED))))
            reasons.append((missing, literal("no_contact_point")))
        else:
            refused = func.substr(fired.c.channel, 1, len(REFUSED)) == REFUSED
            whens.append((refused, literal(str(OccurrenceStatus.SKIPPED))))
            reasons.append((refused, func.substr(fired.c.channel, len(REFUSED) + 1)))
            channel = case((refused, null()), else_=fired.c.channel)
        status: ColumnElement[Any] = literal(str(OccurrenceStatus.MESSAGE))
        reason: ColumnElement[Any] = null()
        if whens:
            status, reason = case(*whens, else_=status), case(*reasons, else_=reason)
        # NULL where the channel is, or holds the reasons none could take it
        recipient: ColumnElement[Any] = case(
            {name: fired.c[column] for name, column in self.contact.items()},
            value=fired.c.channel, else_=null()) if self.contact else null()
        if trig.holdout > 0:
            recipient = case((fired.c.arm == "holdout", null()), else_=recipient)
        return channel, status, reason, recipient

    def _arm_and_variant(self, trig: Trigger, cols: dict[str, ColumnElement[Any]],
                         ) -> tuple[ColumnElement[Any] | None, ColumnElement[Any]]:
        """The holdout arm (None: no holdout, all treated) and the variant of each candidate,
        by deterministic buckets."""
        arm: ColumnElement[Any] | None = None
        if trig.holdout > 0:
            bucket = bucket_sql(cols["customer_id"], cols["membership_id"],
                                salt(trig.id, "holdout"))
            arm = case((bucket < round(trig.holdout * BUCKETS), literal("holdout")),
                       else_=literal("treatment"))
        variant: ColumnElement[Any] = cast(null(), String)
        if trig.variants:
            cutoffs = variant_cutoffs({k: v.weight for k, v in trig.variants.items()})
            bucket = bucket_sql(cols["customer_id"], cols["membership_id"],
                                salt(trig.id, "variant"))
            variant = pick_variant_sql(bucket, cutoffs)
        return arm, variant

    def _channel(self, trig: Trigger, cols: dict[str, ColumnElement[Any]]) -> ColumnElement[Any]:
        """The first of the (variant's) channel and the fallbacks the customer can receive."""
        by_variant: list[tuple[ColumnElement[Any], ColumnElement[Any]]] = []
        for name, variant in trig.variants.items():
            if variant.channel:
                by_variant.append((cols["variant"] == name, self._channel_case(
                    cols, [variant.channel, *trig.action.fallback])))
        default = self._channel_case(cols, [trig.action.channel, *trig.action.fallback])
        return case(*by_variant, else_=default) if by_variant else default

    def _channel_case(self, cols: dict[str, ColumnElement[Any]],
                      channels: list[str]) -> ColumnElement[Any]:
        whens = []
        for name in dict.fromkeys(channels):
            column = cols[self.contact[name]]
            whens.append((and_(column.is_not(None), column != ""), literal(name)))
        return case(*whens, else_=null())

    def _to_outbox(self, conn: Connection, tick_id: int,
                   now: datetime) -> tuple[int, int, int, int]:
        """The tick's occurrences with status `message` become queued messages, every trigger in
        one INSERT; (held out, skipped, messages, skipped without a channel) of the tick."""
        o = table(Occurrence)
        skipped = o.c.status == str(OccurrenceStatus.SKIPPED)
        # one pass with a count per status, not a GROUP BY: PostgreSQL plans the tick's rows as
        # one and sorted them for it, spilling tens of thousands to disk
        counts = conn.execute(select(
            func.count().filter(o.c.status == str(OccurrenceStatus.HELD_OUT)),
            func.count().filter(skipped),
            func.count().filter(o.c.status == str(OccurrenceStatus.MESSAGE)),
            func.count().filter(skipped, o.c.channel.is_(None)),
        ).where(o.c.tick_id == tick_id)).one()
        conn.execute(self._outbox_insert(self.policy is not None),
                     {"outbox_tick": tick_id, "outbox_now": now})
        held_out, skipped_n, messages, no_channel = (int(n) for n in counts)
        return held_out, skipped_n, messages, no_channel

    def _outbox_insert(self, policy: bool) -> Any:
        """The outbox INSERT, built once (per policy mode): the tick and its instant are bound
        when it runs, so the compiled statement is reused."""
        built = self._outbox_statements.get(policy)
        if built is None:
            built = self._outbox_statements[policy] = self._build_outbox_insert(policy)
        return built

    def _build_outbox_insert(self, policy: bool) -> Any:
        o = table(Occurrence)
        templates: dict[str, ColumnElement[Any]] = {}
        for loaded in self.triggers:
            trig = loaded.trigger
            overrides = [(o.c.variant == n, literal(v.template))
                         for n, v in trig.variants.items() if v.template]
            templates[trig.id] = case(*overrides, else_=literal(trig.action.template)) \
                if overrides else literal(trig.action.template)
        template = case(templates, value=o.c.trigger_id, else_=null()) if templates else null()
        costs = self.config.policy.cost if policy else {}
        cost = case(*((o.c.channel == name, literal(value)) for name, value in costs.items()),
                    else_=null()) if costs else cast(null(), Float)
        now = bindparam("outbox_now", type_=DateTime())
        due = func.coalesce(o.c.not_before, now) if policy else now
        return insert(Message).from_select(
            ["occurrence_id", "customer_id", "trigger_id", "channel", "template", "recipient",
             "status", "due_at", "created_at", "attempts", "cost", "membership_id"],
            select(o.c.id, o.c.customer_id, o.c.trigger_id, o.c.channel, template, o.c.recipient,
                   literal(str(MessageStatus.QUEUED)), due, now, literal(0), cost,
                   o.c.membership_id)
            .where(o.c.tick_id == bindparam("outbox_tick", type_=Integer()),
                   o.c.status == str(OccurrenceStatus.MESSAGE)),
        )

    def record_broken(self, broken: dict[str, list[str]]) -> None:
        """Mark triggers that failed to load as disabled, with their errors, for the API."""
        with self.engine.begin() as conn:
            for trigger_id, errors in broken.items():
                values = {"enabled": False, "errors": {"errors": errors}}
                if conn.execute(update(TriggerState).where(TriggerState.trigger_id == trigger_id)
                                .values(**values)).rowcount == 0:
                    conn.execute(insert(TriggerState).values(trigger_id=trigger_id, **values))

    # bookkeeping -------------------------------------------------------------------------------

    def _rule_file_versions(self, conn: Connection, now: datetime) -> dict[str, int]:
        """Record each rule file's content once per version; path -> version id."""
        out: dict[str, int] = {}
        for path, (sha, text) in self.files.items():
            found = conn.execute(select(RuleFileVersion.id).where(
                RuleFileVersion.path == path, RuleFileVersion.sha256 == sha)).scalar()
            if found is None:
                conn.execute(insert_ignore(conn, RuleFileVersion.__table__).values(
                    path=path, sha256=sha, content=text, loaded_at=now))
                found = conn.execute(select(RuleFileVersion.id).where(
                    RuleFileVersion.path == path, RuleFileVersion.sha256 == sha)).scalar_one()
            out[path] = int(found)
        return out

    def _save_states(self, conn: Connection,
                     saved: Sequence[tuple[str, bool, int | None, str, int]], event_max: int,
                     stage_max: int, now: datetime) -> None:
        """Each trigger's watermarks, rule-file version and count: one executemany UPDATE for the
        triggers seen before, one INSERT for new ones."""
        known = [{"s_id": tid, "s_version": version, "s_path": path, "s_fired": fired,
                  "s_events": event_max, "s_stages": stage_max, "s_now": now}
                 for tid, seen, version, path, fired in saved if seen]
        new: list[dict[str, Any]] = [
            {"trigger_id": tid, "rule_file_version_id": version, "path": path,
             "fired_total": fired, "enabled": True, "errors": {}, "event_watermark": event_max,
             "stage_watermark": stage_max, "last_tick_at": now}
            for tid, seen, version, path, fired in saved if not seen]
        if known:
            conn.execute(self._update_state, known)
        if new:
            conn.execute(insert(TriggerState), new)

    @functools.cached_property
    def _update_state(self) -> Any:
        t = table(TriggerState)
        return (update(t).where(t.c.trigger_id == bindparam("s_id", type_=t.c.trigger_id.type))
                .values(fired_total=t.c.fired_total + bindparam("s_fired", type_=Integer()),
                        rule_file_version_id=bindparam("s_version", type_=BigInteger()),
                        path=bindparam("s_path", type_=t.c.path.type), enabled=True, errors={},
                        event_watermark=bindparam("s_events", type_=BigInteger()),
                        stage_watermark=bindparam("s_stages", type_=BigInteger()),
                        last_tick_at=bindparam("s_now", type_=t.c.last_tick_at.type)))


@functools.lru_cache(maxsize=1024)
def _day_count_equals(text: str) -> tuple[str, int] | None:
    """(customer column, k) if the condition is exactly `<whole days since that column> == k`."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(tree, ast.Compare) and len(tree.ops) == 1
            and isinstance(tree.ops[0], ast.Eq)):
        return None
    name, value = tree.left, tree.comparators[0]
    if isinstance(name, ast.Constant):
        name, value = value, name
    if not (isinstance(name, ast.Name) and isinstance(value, ast.Constant)
            and type(value.value) is int and value.value >= 0):
        return None
    try:
        clocked = resolve(name.id).clocked
    except UnknownName:
        return None
    if clocked is None or clocked.source != "customer" or clocked.sign <= 0 or clocked.local_date:
        return None
    return clocked.column, value.value


def _zones(conn: Connection) -> list[str]:
    """The distinct customer time zones, read as a skip scan over the timezone index (one
    probe per zone, not one row per customer)."""
    c = Customer.__table__
    found: list[str] = []
    tz = conn.execute(select(func.min(c.c.timezone))).scalar()
    while tz is not None:
        found.append(tz)
        tz = conn.execute(select(func.min(c.c.timezone)).where(c.c.timezone > tz)).scalar()
    return found


def _fire_date(when: RelativeWhen, day: LocalDay) -> date:
    """The local date of a date-relative trigger's latest firing time: today once `at` has
    passed, else yesterday."""
    return day.today if day.local_now.time() >= when.at else day.today - timedelta(1)


def _slot(when: RelativeWhen | ScheduleWhen, day: LocalDay) -> str | None:
    """The slot a date or schedule trigger is due in, in the day's zone: its firing date, or
    its schedule's latest firing within the last day (None: none)."""
    if isinstance(when, RelativeWhen):
        return _fire_date(when, day).isoformat()
    return _latest_slot(when.schedule, day)


@functools.lru_cache(maxsize=1024)
def _latest_slot(expr: str, day: LocalDay) -> str | None:
    """The most recent local firing of a cron expression within the last day, as an ISO string.
    Kept for the instants of a tick: its candidates and settled slots ask again."""
    cron, tz = _cron(expr, day.tz), ZoneInfo(day.tz)
    now = day.local_now.replace(tzinfo=tz)
    fire = cron.get_next_fire_time(None, now - timedelta(days=1))
    latest = None
    while fire is not None and fire <= now:
        latest = fire
        fire = cron.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return latest.replace(tzinfo=None).isoformat(timespec="minutes") if latest else None


@functools.lru_cache(maxsize=256)
def _cron(expr: str, tz: str) -> CronTrigger:
    """A schedule in a zone, parsed once."""
    return CronTrigger.from_crontab(expr, timezone=ZoneInfo(tz))


def _bound_in_full(stmt: Any) -> bool:
    """No instant in `stmt` is a value of its own (a statement built over the tick's instant
    without `TickInstants` would carry that tick's): only then may it run in another tick."""
    return stmt is None or not any(
        isinstance(element, BindParameter) and isinstance(element.value, datetime)
        for element in visitors.iterate(stmt))
