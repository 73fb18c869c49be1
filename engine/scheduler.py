"""The in-process scheduler (APScheduler 3.x): periodic full ticks, frequent incremental ticks,
the dispatcher, and a one-shot full tick at each local `at:` instant of date-relative triggers.

Choices:
- `coalesce=True`, `max_instances=1`: a tick that overran is not followed by a burst of catch-up
  ticks; one tick sees everything due anyway.
- `misfire_grace_time` equal to the interval: a late tick still runs, a very late one is dropped
  (the next one covers it).
- The tick lease in the database (`engine.evaluation.TICK_LEASE`) makes a second process's tick a
  no-op while one is running, so several `touchpoints run` processes never tick together.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from sqlalchemy import select

from engine.evaluation import TickBusy, TickKind
from engine.models import Customer
from engine.rulefile import RelativeWhen
from engine.runtime import Runtime

__all__ = ["Scheduler", "next_local_boundary"]

log = logging.getLogger(__name__)


def next_local_boundary(now: datetime, zones: set[str], times: set[tuple[int, int]]) -> datetime:
    """The next UTC instant (naive) at which any local `at` time begins in any of the zones."""
    best: datetime | None = None
    aware_now = now.replace(tzinfo=UTC)
    for tz in zones:
        zone = ZoneInfo(tz)
        local = aware_now.astimezone(zone)
        for day in (0, 1, 2):
            base = (local + timedelta(days=day)).date()
            for hour, minute in times:
                candidate = datetime(base.year, base.month, base.day, hour, minute, tzinfo=zone)
                moment = candidate.astimezone(UTC).replace(tzinfo=None)
                if moment > now and (best is None or moment < best):
                    best = moment
    return best or now + timedelta(days=1)


class Scheduler:
    """Runs ticks and dispatch for one runtime."""

    def __init__(self, runtime: Runtime, *, blocking: bool = True,
                 incremental_seconds: float = 10.0) -> None:
        self.runtime = runtime
        interval = runtime.settings.tick_interval_seconds
        self.scheduler: BaseScheduler = BlockingScheduler(timezone=UTC) if blocking \
            else BackgroundScheduler(timezone=UTC)
        defaults = {"coalesce": True, "max_instances": 1}

        def grace(seconds: float) -> int:
            return max(1, int(seconds))

        self.scheduler.add_job(self.full_tick, "interval", seconds=interval, id="full-tick",
                               misfire_grace_time=grace(interval),
                               next_run_time=datetime.now(UTC), **defaults)
        self.scheduler.add_job(self.incremental_tick, "interval", seconds=incremental_seconds,
                               id="incremental-tick", misfire_grace_time=grace(incremental_seconds),
                               **defaults)
        dispatch = runtime.settings.dispatch_interval_seconds
        self.scheduler.add_job(self.dispatch, "interval", seconds=dispatch, id="dispatch",
                               misfire_grace_time=grace(dispatch), **defaults)
        self.dispatcher = runtime.dispatcher()
        self._arm_boundary()

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.shutdown(wait=True)
        self.dispatcher.close()

    def _tick(self, kind: TickKind) -> None:
        try:
            result = self.runtime.evaluator.tick(kind=kind)
        except TickBusy:
            log.info("%s tick skipped: another process is ticking", kind)
            return
        log.info("%s tick: %s", kind, result.as_dict())

    def full_tick(self) -> None:
        self._tick(TickKind.FULL)

    def incremental_tick(self) -> None:
        self._tick(TickKind.INCREMENTAL)

    def boundary_tick(self) -> None:
        self._tick(TickKind.FULL)
        self._arm_boundary()

    def dispatch(self) -> None:
        report = self.dispatcher.run_once(self.runtime.settings.dispatch_batch_size)
        if report.claimed:
            log.info("dispatched: %s", report)

    def _arm_boundary(self) -> None:
        """Schedule a full tick at the next instant a date-relative trigger's local time begins."""
        times = {(t.trigger.when.at.hour, t.trigger.when.at.minute)
                 for t in self.runtime.evaluator.triggers
                 if isinstance(t.trigger.when, RelativeWhen)}
        if not times:
            return
        with self.runtime.engine.connect() as conn:
            zones = {self.runtime.config.club.timezone, *(
                z for z in conn.execute(select(Customer.timezone).distinct()).scalars() if z)}
        now = self.runtime.clock.now()
        at = next_local_boundary(now, zones, times)
        self.scheduler.add_job(self.boundary_tick, "date", run_date=at.replace(tzinfo=UTC),
                               id="boundary-tick", replace_existing=True, misfire_grace_time=3600)
