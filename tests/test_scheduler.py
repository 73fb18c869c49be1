"""Scheduler timing: the next local `at` instant across time zones and daylight-saving changes."""

from __future__ import annotations

from datetime import datetime

from engine.scheduler import next_local_boundary


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
