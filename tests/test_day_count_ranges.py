"""The index range a trigger adds for `days_since_last_visit == k` never drops a customer the
condition selects, whatever the clock, the fraction of a second or k, on every backend."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert

from engine.clock import FixedClock
from engine.conditions import compile_condition
from engine.config import ProjectConfig
from engine.evaluation import Evaluator
from engine.models import Customer

NOW = datetime(2026, 3, 29, 0, 30)
DAY = 86400


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(visits=st.lists(st.tuples(st.integers(-40 * DAY, 2 * DAY), st.integers(0, 999_999)),
                       min_size=1, max_size=12),
       k=st.integers(0, 30), micros=st.integers(0, 999_999))
def test_range_keeps_every_match(db: Engine, project_config: ProjectConfig,
                                 visits: list[tuple[int, int]], k: int, micros: int) -> None:
    now = NOW + timedelta(microseconds=micros)
    with db.begin() as conn:
        conn.execute(delete(Customer))
        for i, (seconds, fraction) in enumerate(visits, start=1):
            # Around the day boundaries of k, where truncation decides.
            seconds = seconds - (seconds % DAY) - k * DAY + (seconds % 7) - 3 if i % 2 else seconds
            conn.execute(insert(Customer).values(
                id=i, external_id=f"c{i}", created_at=NOW, updated_at=NOW, attributes={},
                last_visit_at=now + timedelta(seconds=seconds, microseconds=fraction)))
    cond = compile_condition(f"days_since_last_visit == {k}")
    loaded: Any = type("L", (), {"conditions": [cond]})()
    evaluator = Evaluator(db, project_config, [], FixedClock(now))
    with db.connect() as conn:
        evaluator._local_days(conn, now)
        ctx, base = evaluator._context(now)
        ranges = evaluator._day_count_ranges(loaded, ctx.customer)
        assert len(ranges) == 1
        plain = set(conn.execute(base.add_columns(ctx.customer.c.id).where(cond.sql(ctx)))
                    .scalars())
        ranged = set(conn.execute(base.add_columns(ctx.customer.c.id)
                                  .where(cond.sql(ctx), *ranges)).scalars())
    assert ranged == plain
