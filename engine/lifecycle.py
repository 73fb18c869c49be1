"""Lifecycle stages: computed set-wise from `config/lifecycle.yaml`, changes recorded per tick.

A customer's stage can change for two reasons only: their data changed (ingestion bumps
`change_seq`), or time moved a day count in a stage condition across one of the constants it is
compared with (`days_until_membership_end > 30` flips on the day the membership end comes within
30 days: the count steps from 31 to 30). `may_have_changed` turns the second into index range
scans on the anchor columns, so a full tick recomputes the stages of the customers near a
boundary instead of the whole base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any

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
from engine.drift import Drift
from engine.metrics import Facts, SqlContext
from engine.models import Customer, StageChange, table

__all__ = ["Lifecycle"]

# Metrics the tick itself writes: a stage condition on them makes stages depend on the previous
# stage, so only a full recomputation is safe.
_SELF_REFERENCING = frozenset({"stage", "days_in_stage"})


class Lifecycle:
    """The stages in precedence order, compiled once."""

    def __init__(self, definition: LifecycleFile) -> None:
        self.definition = definition
        self.stages: list[tuple[str, list[Condition]]] = [
            (s.id, [compile_condition(c) for c in s.conditions]) for s in definition.stages
        ]
        self.fingerprint = hashlib.sha256(definition.model_dump_json().encode()).hexdigest()[:16]
        # a stage condition on a windowed count restages everyone: only day counts are bounded
        self.watches = Drift.of((c for s in definition.stages for c in s.conditions),
                                windows=False, unbounded=_SELF_REFERENCING)

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
        moved = self.watches.moved(then, now, zones)
        if moved is None:
            return None
        c = Customer.__table__
        return union_all(select(c.c.id).where(c.c.stage.is_(None)),
                         select(c.c.id).where(c.c.change_seq > previous_seq),
                         *moved).subquery("restaged").select()

    def record_changes(self, conn: Connection, base: Select[Any], ctx: SqlContext, tick_id: int,
                       now: datetime, *, copy: Table | None = None) -> int:
        """Insert a stage_history row for every customer in `base` whose stage or cycle changed,
        then move those customers to their new stage. `base` selects from the customers of `ctx`
        (the table, or `copy`: a copy of some of its rows, moved too), whose current membership
        is on their rows; it may carry extra filters."""
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
