"""The fitness-club demo: a simulated club (`engine.simulator`, `config/demo.yaml`) lives through a
year on a virtual clock, through the real engine (daily full ticks, contact policy, outbox,
dispatcher, console channel), on SQLite, with no credentials; then the statistics and the HTML
report.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from engine.clock import FixedClock
from engine.models import Customer, Message, Occurrence
from engine.runtime import Runtime
from engine.settings import Settings
from engine.simulator import DemoConfig, Simulation, SimulationSummary, load_demo_config
from engine.stats import Stats, compute_stats, goals_of

__all__ = ["DemoReport", "run_demo"]


@dataclass
class DemoReport:
    members: int
    days: int
    ticks: int
    seconds: float
    messages_by_trigger: dict[str, int]
    messages_by_channel: dict[str, int]
    held_out: int
    skipped: int
    stages: dict[str, int]
    renewals: int
    lapses: int
    outbox_path: Path
    database_url: str
    config: DemoConfig
    summary: SimulationSummary
    report_path: Path | None = None
    stats: Stats | None = None
    stats_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_demo(*, members: int | None = None, months: int | None = None, seed: int | None = None,
             days: int | None = None,
             workdir: Path = Path("var/demo"), config_path: Path = Path("config/demo.yaml"),
             settings: Settings | None = None,
             progress: Callable[[int, int], None] | None = None,
             write_report: bool = True, **overrides: Any) -> DemoReport:
    """Simulate the club for `months` months through the engine, and report what it did.

    `overrides` replace other fields of the demo config (e.g. plan_days for a test club)."""
    began = time.perf_counter()
    cfg = load_demo_config(config_path, members=members, months=months, seed=seed, days=days,
                           **overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "club.db"
    outbox = workdir / "outbox.jsonl"
    for stale in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), outbox):
        stale.unlink(missing_ok=True)
    clock = FixedClock(datetime.combine(cfg.start, dtime()))
    base = settings or Settings()
    # The demo's database is rebuilt on every run: no need to wait for the disk at each commit.
    settings = base.model_copy(update={"database_url": f"sqlite:///{db_path}",
                                       "console_outbox_path": outbox,
                                       "sqlite_synchronous": "OFF"})
    runtime = Runtime.load(settings, clock)
    simulation = Simulation(cfg, runtime, clock)
    summary = simulation.run(progress)

    with runtime.engine.connect() as conn:
        by_trigger = dict(conn.execute(select(Message.trigger_id, func.count())
                                       .group_by(Message.trigger_id)).all())
        by_channel = dict(conn.execute(select(Message.channel, func.count())
                                       .group_by(Message.channel)).all())
        statuses = Tally(dict(conn.execute(select(Occurrence.status, func.count())
                                           .group_by(Occurrence.status)).all()))
        stages = dict(conn.execute(select(Customer.stage, func.count())
                                   .group_by(Customer.stage)).all())
    stats_began = time.perf_counter()
    stats = compute_stats(runtime.engine, goals_of(runtime.ruleset.triggers))
    report_path: Path | None = None
    if write_report:
        from engine.report import write_report as write

        report_path = write(workdir / "report.html", stats, cfg, summary,
                            messages_by_channel=by_channel, seconds=time.perf_counter() - began)
    runtime.engine.dispose()
    return DemoReport(
        members=summary.members, days=summary.days, ticks=summary.ticks,
        seconds=time.perf_counter() - began,
        messages_by_trigger={str(k): int(v) for k, v in by_trigger.items()},
        messages_by_channel={str(k): int(v) for k, v in by_channel.items()},
        held_out=statuses.get("held_out", 0), skipped=statuses.get("skipped", 0),
        stages={str(k): v for k, v in stages.items()}, renewals=summary.renewals,
        lapses=summary.lapses, outbox_path=outbox, database_url=settings.database_url,
        config=cfg, summary=summary, stats=stats, report_path=report_path,
        stats_seconds=time.perf_counter() - stats_began)
