"""Scheduler timing: the next local `at` instant across time zones and daylight-saving changes."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, func, select

from engine.clock import FixedClock
from engine.models import Tick
from engine.runtime import Runtime
from engine.scheduler import Scheduler, next_local_boundary
from engine.settings import Settings
from tests.conftest import ROOT
from tests.test_evaluation import seed


def test_next_boundary_in_the_customers_zone() -> None:
    # 2026-03-02 09:00 UTC is 10:00 in Berlin and 01:00 in Los Angeles.
    now = datetime(2026, 3, 2, 9, 0)
    assert next_local_boundary(now, {"Europe/Berlin"}, {(10, 30)}) == datetime(2026, 3, 2, 9, 30)
    assert next_local_boundary(now, {"America/Los_Angeles"}, {(10, 0)}) == \
        datetime(2026, 3, 2, 18, 0)
    assert next_local_boundary(now, {"Europe/Berlin", "America/Los_Angeles"},
                               {(10, 0)}) == datetime(2026, 3, 2, 18, 0)


def test_boundary_across_daylight_saving_changes() -> None:
    # Europe springs forward on 2026-03-29: 10:00 local is 08:00 UTC that day, 09:00 the day before.
    assert next_local_boundary(datetime(2026, 3, 28, 9, 30), {"Europe/Berlin"}, {(10, 0)}) == \
        datetime(2026, 3, 29, 8, 0)
    # The US falls back on 2026-11-01: 10:00 in Los Angeles is 18:00 UTC, not 17:00.
    assert next_local_boundary(datetime(2026, 10, 31, 17, 30), {"America/Los_Angeles"},
                               {(10, 0)}) == datetime(2026, 11, 1, 18, 0)


def test_boundary_is_strictly_in_the_future() -> None:
    now = datetime(2026, 3, 2, 9, 30)
    assert next_local_boundary(now, {"Europe/Berlin"}, {(10, 30)}) == datetime(2026, 3, 3, 9, 30)


def test_scheduler_ticks_and_dispatches(db: Engine, tmp_path: Path) -> None:
    """The real APScheduler jobs run a tick and a dispatch against the database."""
    clock = FixedClock(datetime(2026, 3, 2, 9, 0))
    seed(db, clock)
    outbox = tmp_path / "out.jsonl"
    settings = Settings(rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                        config_dir=ROOT / "config", tick_interval_seconds=0.2,
                        dispatch_interval_seconds=0.2, console_outbox_path=outbox)
    runtime = Runtime.load(settings, clock, engine=db)
    scheduler = Scheduler(runtime, blocking=False, incremental_seconds=0.2)
    assert scheduler.scheduler.get_job("boundary-tick") is not None
    scheduler.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not outbox.exists():
            time.sleep(0.1)
    finally:
        scheduler.shutdown()
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Tick)).scalar()
    sent = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert {m["trigger"] for m in sent} == {"welcome"}  # ann, who is onboarding
