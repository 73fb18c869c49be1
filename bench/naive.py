"""The naive baseline: evaluate customers one at a time in Python, as a loop over the base would.

For each sampled customer: load their rows (`engine.explain.load_facts`: the customer, the current
membership, their events), compute the stage with `Lifecycle.stage_py`, and for every trigger
check its stages, its `when` (in the customer's local time) and its conditions with
`Condition.py`. The time for the sample is extrapolated linearly to the whole base.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from rig import Loaded
from sqlalchemy import Engine, func, select

from engine.config import ProjectConfig
from engine.evaluation import LocalDay, _latest_slot
from engine.explain import load_facts
from engine.lifecycle import Lifecycle
from engine.metrics import Facts
from engine.models import Customer, Occurrence
from engine.rulefile import Anchor, EventWhen, EveryScope, RelativeWhen, ScheduleWhen, StageWhen

__all__ = ["run"]


def _local(tz: str, now: datetime) -> LocalDay:
    local = now.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    return LocalDay(tz, local.date(), local)


def _due(loaded: Loaded, facts: Facts, stage: str, day: LocalDay, conn: Any) -> bool:
    trig = loaded.trigger
    when = trig.when
    if isinstance(when, RelativeWhen):
        if facts.membership is None:
            return False
        fire = day.today if day.local_now.time() >= when.at else day.today - timedelta(1)
        column = "ends_on" if when.anchor is Anchor.MEMBERSHIP_ENDS else "starts_on"
        due = facts.membership[column] == fire - timedelta(days=when.offset_days)
    elif isinstance(when, StageWhen):
        due = stage == when.stage_entered and facts.customer["stage"] != stage
    elif isinstance(when, EventWhen):
        due = any(facts.now - when.within < t <= facts.now
                  for t in facts.events.get(when.event, ()))
    else:
        assert isinstance(when, ScheduleWhen)
        due = _latest_slot(when.schedule, day) is not None
    if due and isinstance(trig.once, EveryScope):
        recent = conn.execute(select(func.count()).where(
            Occurrence.trigger_id == trig.id, Occurrence.customer_id == facts.customer["id"],
            Occurrence.fired_at > facts.now - trig.once.every)).scalar()
        due = not recent
    return due


def run(engine: Engine, config: ProjectConfig, triggers: list[Loaded], now: datetime,
        sample: int) -> dict[str, Any]:
    """Evaluate `sample` customers spread over the id range; seconds, and the extrapolation."""
    lifecycle = Lifecycle(config.lifecycle)
    default_tz = config.club.timezone
    matches = 0
    with engine.connect() as conn:
        top = conn.execute(select(func.max(Customer.id))).scalar() or 0
        step = max(top // sample, 1)
        ids = list(range(1, top + 1, step))[:sample]
        started = time.perf_counter()
        for cid in ids:
            facts = load_facts(conn, cid, now, default_tz)
            stage = lifecycle.stage_py(facts)
            day = _local(facts.customer["timezone"] or default_tz, now)
            for loaded in triggers:
                if loaded.trigger.stages and stage not in loaded.trigger.stages:
                    continue
                if not all(c.py(facts) for c in loaded.conditions):
                    continue
                if _due(loaded, facts, stage, day, conn):
                    matches += 1
        seconds = time.perf_counter() - started
    return {"sample": len(ids), "seconds": seconds, "per_customer_ms": seconds / len(ids) * 1e3,
            "extrapolated_seconds": seconds / len(ids) * top, "matches_in_sample": matches}
