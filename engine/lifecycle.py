"""Lifecycle stages: computed set-wise from `config/lifecycle.yaml`, changes recorded per tick.

A customer's stage can change for two reasons only: their data changed (ingestion bumps
`change_seq`), or time moved a day count in a stage condition across one of the constants it is
compared with (`days_until_membership_end > 30` flips on the day the membership end comes within
31 days). `may_have_changed` turns the second into index range scans on the anchor columns, so a
full tick recomputes the stages of the customers near a boundary instead of the whole base.
"""

from __future__ import annotations

import ast
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    and_,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)

from engine.conditions import Condition, compile_condition
from engine.config import LifecycleFile
from engine.db import analyze_if_grown
from engine.metrics import Clocked, Facts, SqlContext, UnknownName, resolve
from engine.models import Customer, Membership, StageChange, table

__all__ = ["Lifecycle"]

# Metrics the tick itself writes: a stage condition on them makes stages depend on the previous
# stage, so only a full recomputation is safe.
_SELF_REFERENCING = {"stage", "days_in_stage"}


@dataclass(frozen=True)
class _Watch:
    """A day count the stage conditions compare with constants, and those constants."""

    clocked: Clocked
    thresholds: frozenset[float]


class Lifecycle:
    """The stages in precedence order, compiled once."""

    def __init__(self, definition: LifecycleFile) -> None:
        self.definition = definition
        self.stages: list[tuple[str, list[Condition]]] = [
            (s.id, [compile_condition(c) for c in s.conditions]) for s in definition.stages
        ]
        self.fingerprint = hashlib.sha256(definition.model_dump_json().encode()).hexdigest()[:16]
        self.watches = _watches(definition)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.stages)

    def stage_sql(self, ctx: SqlContext) -> ColumnElement[Any]:
        """A CASE expression naming each customer's stage."""
        whens = [(and_(*(c.sql(ctx) for c in conds)), literal(stage_id))
                 for stage_id, conds in self.stages[:-1]]
        if not whens:
            return literal(self.stages[-1][0])
        return case(*whens, else_=literal(self.stages[-1][0]))

    def stage_py(self, facts: Facts) -> str:
        for stage_id, conds in self.stages:
            if all(c.py(facts) for c in conds):
                return stage_id
        return self.stages[-1][0]

    def trace(self, facts: Facts) -> list[dict[str, Any]]:
        """Each stage's conditions with pass/fail and the values seen, for `explain`."""
        return [
            {"stage": stage_id,
             "conditions": [{"condition": c.text, "passed": c.py(facts), "values": c.values(facts)}
                            for c in conds]}
            for stage_id, conds in self.stages
        ]

    def may_have_changed(self, then: datetime, now: datetime, zones: Iterable[str],
                         previous_seq: int) -> Select[Any] | None:
        """Ids of every customer whose stage may differ between instants `then` and `now`: never
        staged, data changed after `previous_seq`, or a day count crossed a constant of a stage
        condition. None when the conditions use something this cannot bound (windowed counts,
        the stage itself): then every customer must be recomputed."""
        if self.watches is None:
            return None
        c = Customer.__table__
        m = Membership.__table__
        early, late = min(then, now), max(then, now)
        # A day count on the local calendar moves only where the local date moved: the zones
        # whose date at `late` is after their date at `early`, between those dates.
        moved = [(d0, d1) for d0, d1 in ((_local_date(tz, early), _local_date(tz, late))
                                         for tz in zones) if d1 > d0]
        if moved:
            first_day = min(d0 for d0, _ in moved)
            last_day = max(d1 for _, d1 in moved)
        parts: list[Select[Any]] = [
            select(c.c.id).where(c.c.stage.is_(None)),
            select(c.c.id).where(c.c.change_seq > previous_seq),
        ]
        second = timedelta(seconds=1)
        for watch in self.watches:
            ranges: list[tuple[Any, Any]] = []
            sign = watch.clocked.sign
            if sign < 0 and not watch.clocked.local_date:
                return None
            # An integer count moving monotonically can flip `count <op> k` only by stepping
            # from b - 1 to b (rising) or from b to b - 1 (falling) for b = floor(k) + 1 or
            # ceil(k) (the two coincide unless k is a whole number: then `== k` flips at both).
            # Each bound below holds every anchor for which such a step falls in (early, late].
            for b in sorted({b for k in watch.thresholds
                             for b in (math.floor(k) + 1, math.ceil(k))}):
                if watch.clocked.local_date and moved:
                    if sign > 0:  # count = local date - anchor reaches b
                        ranges.append((first_day - timedelta(days=b - 1),
                                       last_day - timedelta(days=b)))
                    else:  # count = anchor - local date falls below b
                        ranges.append((first_day + timedelta(days=b),
                                       last_day + timedelta(days=b - 1)))
                elif not watch.clocked.local_date:
                    # whole 24-hour periods since a timestamp t, truncated toward zero: the
                    # count reaches b >= 1 when the clock passes t + b days, b <= 0 when it
                    # passes t + (b - 1) days; a second of slack for the truncation
                    shift = timedelta(days=b if b >= 1 else b - 1)
                    ranges.append((early - shift - second, late - shift + second))
            table = c if watch.clocked.source == "customer" else m
            key = c.c.id if table is c else m.c.customer_id
            column = table.c[watch.clocked.column]
            for low_end, high_end in _merged(ranges):
                parts.append(select(key).where(column.between(low_end, high_end)))
        return union_all(*parts).subquery("restaged").select()

    def record_changes(self, conn: Connection, base: Select[Any], ctx: SqlContext, tick_id: int,
                       now: datetime, *, copy: Table | None = None) -> int:
        """Insert a stage_history row for every customer in `base` whose stage or cycle changed,
        then move those customers to their new stage. `base` selects from the customers of `ctx`
        (the table, or `copy`: a copy of some of its rows, moved too) joined with the current
        membership; it may carry extra filters."""
        c = ctx.customer
        computed = (
            base.add_columns(
                c.c.id.label("customer_id"),
                c.c.current_membership_id.label("membership_id"),
                c.c.stage.label("old_stage"),
                c.c.stage_membership_id.label("old_membership_id"),
                self.stage_sql(ctx).label("new_stage"),
            ).subquery("computed")
        )
        changed = select(
            computed.c.customer_id, computed.c.membership_id, computed.c.new_stage,
            computed.c.old_stage, literal(now), literal(tick_id),
        ).where(or_(
            computed.c.old_stage.is_(None),
            computed.c.old_stage != computed.c.new_stage,
            func.coalesce(computed.c.old_membership_id, -1)
            != func.coalesce(computed.c.membership_id, -1),
        ))
        sh = table(StageChange)
        inserted = conn.execute(
            insert(sh).from_select(
                ["customer_id", "membership_id", "stage", "previous_stage", "entered_at",
                 "tick_id"], changed)
        ).rowcount
        if inserted:
            for target in (table(Customer), *([copy] if copy is not None else [])):
                conn.execute(
                    update(target)
                    .where(target.c.id == sh.c.customer_id, sh.c.tick_id == tick_id)
                    .values(stage=sh.c.stage, stage_membership_id=sh.c.membership_id,
                            stage_since=sh.c.entered_at)
                )
            _refresh_statistics(conn, int(inserted))
        return int(inserted)


def _refresh_statistics(conn: Connection, changed: int) -> None:
    """ANALYZE customers and stage_history on PostgreSQL when this tick moved many customers.

    The trigger selections that follow in the same transaction filter on `customers.stage` and
    read `stage_history`; with statistics from before the change (on a new base: every stage
    NULL, no history) the planner expects one row and nests a full aggregate of the history
    inside a loop over customers: quadratic, an hour at a million customers. ANALYZE in the
    transaction samples its own uncommitted rows."""
    analyze_if_grown(conn, table(Customer).name, changed, also=(table(StageChange).name,))


def _local_date(tz: str, moment: datetime) -> date:
    return moment.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)).date()


def _merged(ranges: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _watches(definition: LifecycleFile) -> list[_Watch] | None:
    """The day counts compared with constants in the stage conditions, or None if some
    time-dependent name is used in any other way."""
    found: dict[Clocked, set[float]] = {}
    for stage in definition.stages:
        for text in stage.conditions:
            tree = ast.parse(text.strip(), mode="eval")
            covered: set[int] = set()
            for node in ast.walk(tree):
                if not isinstance(node, ast.Compare):
                    continue
                operands = [node.left, *node.comparators]
                for i, operand in enumerate(operands):
                    metric = _metric(operand)
                    if metric is None or metric.timeless:
                        continue
                    neighbours = operands[max(i - 1, 0):i] + operands[i + 1:i + 2]
                    values = [_numbers(n) for n in neighbours]
                    if metric.clocked is None or any(v is None for v in values):
                        continue
                    found.setdefault(metric.clocked, set()).update(
                        x for v in values for x in v or ())
                    covered.add(id(operand))
            for node in ast.walk(tree):
                metric = _metric(node)
                if metric is None:
                    continue
                if metric.name in _SELF_REFERENCING:
                    return None
                if not metric.timeless and id(node) not in covered:
                    return None
    return [_Watch(clocked, frozenset(values)) for clocked, values in found.items()]


def _metric(node: ast.AST) -> Any:
    if not isinstance(node, ast.Name):
        return None  # attributes.<key> are customer data: timeless
    try:
        return resolve(node.id)
    except UnknownName:
        return None  # true / false


def _numbers(node: ast.expr) -> list[float] | None:
    """The numeric constants of `node` (a number or a list of numbers); [] for None."""
    items = node.elts if isinstance(node, ast.List | ast.Tuple) else [node]
    out: list[float] = []
    for item in items:
        sign = 1
        if isinstance(item, ast.UnaryOp) and isinstance(item.op, ast.USub):
            sign, item = -1, item.operand
        if isinstance(item, ast.Constant) and item.value is None:
            continue
        if not (isinstance(item, ast.Constant) and isinstance(item.value, int | float)
                and not isinstance(item.value, bool)):
            return None
        out.append(sign * float(item.value))
    return out
