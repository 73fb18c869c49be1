"""Lifecycle stages: computed set-wise from `config/lifecycle.yaml`, changes recorded per tick."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, case, func, insert, literal, or_
from sqlalchemy import select, update

from engine.conditions import Condition, compile_condition
from engine.config import LifecycleFile
from engine.metrics import Facts, SqlContext
from engine.models import Customer, StageChange

__all__ = ["Lifecycle"]


class Lifecycle:
    """The stages in precedence order, compiled once."""

    def __init__(self, definition: LifecycleFile) -> None:
        self.definition = definition
        self.stages: list[tuple[str, list[Condition]]] = [
            (s.id, [compile_condition(c) for c in s.conditions]) for s in definition.stages
        ]

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

    def record_changes(self, conn: Connection, base: Select[Any], ctx: SqlContext, tick_id: int,
                       now: datetime) -> int:
        """Insert a stage_history row for every customer in `base` whose stage or cycle changed,
        then move those customers to their new stage. `base` selects from customers `c` joined
        with the current membership and the local-date table; it may carry extra filters."""
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
        sh = StageChange.__table__
        inserted = conn.execute(
            insert(sh).from_select(
                ["customer_id", "membership_id", "stage", "previous_stage", "entered_at",
                 "tick_id"], changed)
        ).rowcount
        if inserted:
            conn.execute(
                update(Customer.__table__)
                .where(Customer.__table__.c.id == sh.c.customer_id, sh.c.tick_id == tick_id)
                .values(stage=sh.c.stage, stage_membership_id=sh.c.membership_id,
                        stage_since=sh.c.entered_at)
            )
        return int(inserted)
