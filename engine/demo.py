"""The fitness-club demo: a generated club lives through a month on a virtual clock, through the
real engine (ticks, outbox, dispatcher, console channel), on SQLite, with no credentials.

Members join on monthly and annual plans, visit with habits that hold or fade, and renew with a
probability driven by how often they came. Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from engine.clock import FixedClock
from engine.evaluation import TickKind
from engine.ingest import CustomerIn, EventIn, MembershipIn
from engine.models import Customer, Message, Occurrence
from engine.runtime import Runtime
from engine.settings import Settings

__all__ = ["DemoReport", "run_demo"]

FIRST = ["Anna", "Ben", "Clara", "David", "Elif", "Felix", "Greta", "Hugo", "Ida", "Jonas",
         "Kira", "Luca", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sami", "Tara", "Umut"]
ZONES = ["Europe/Berlin"] * 8 + ["Europe/London", "America/New_York"]


@dataclass
class Member:
    external_id: str
    habit: float  # expected visits per week
    fade: float  # weekly multiplicative change of the habit
    plan: str
    ends_on: date
    cycle: int = 1


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
    extra: dict[str, Any] = field(default_factory=dict)


def run_demo(*, members: int = 300, days: int = 30, seed: int = 7,
             start: date = date(2026, 1, 5), workdir: Path = Path("var/demo"),
             ticks_per_day: int = 24,
             progress: Callable[[int, int], None] | None = None) -> DemoReport:
    """Generate the club, replay `days` days, and report what the engine did."""
    began = time.perf_counter()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "club.db"
    outbox = workdir / "outbox.jsonl"
    for stale in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm"), outbox):
        stale.unlink(missing_ok=True)
    clock = FixedClock(datetime.combine(start, datetime.min.time()))
    settings = Settings(database_url=f"sqlite:///{db_path}", console_outbox_path=outbox)
    runtime = Runtime.load(settings, clock)
    dispatcher = runtime.dispatcher()
    club: dict[str, Member] = {}

    def join(today: date, n: int, backdate: bool) -> None:
        customers, memberships, visits = [], [], []
        for _ in range(n):
            i = len(club) + 1
            ext = f"M{i:05d}"
            plan = "annual" if rng.random() < 0.45 else "monthly"
            length = 365 if plan == "annual" else 30
            starts = today - timedelta(days=rng.randrange(length) if backdate else 0)
            member = Member(ext, habit=max(0.2, rng.gauss(2.2, 1.1)),
                            fade=rng.choice([1.0, 1.0, 0.93, 0.85]), plan=plan,
                            ends_on=starts + timedelta(days=length - 1))
            club[ext] = member
            name = rng.choice(FIRST)
            has_phone = rng.random() < 0.8
            customers.append(CustomerIn(
                external_id=ext, first_name=name, email=f"{name.lower()}.{i}@example.com",
                phone=f"+49151{i:08d}" if has_phone else None,
                chat_id=str(700000 + i) if rng.random() < 0.4 else None,
                timezone=rng.choice(ZONES), segment=rng.choice("AABBBCCCCC"), locale="de-DE"))
            memberships.append(MembershipIn(
                external_id=f"{ext}-1", customer_external_id=ext, plan=plan,
                price=480.0 if plan == "annual" else 45.0, starts_on=starts,
                ends_on=member.ends_on))
            if backdate:
                day = starts
                while day < today:
                    if rng.random() < member.habit / 7:
                        visits.append(_visit(ext, day, rng))
                    day += timedelta(days=1)
        runtime.ingestor.customers(customers)
        runtime.ingestor.memberships(memberships)
        if visits:
            runtime.ingestor.events(visits)

    join(start, members, backdate=True)
    renewals = lapses = ticks = 0
    step = timedelta(hours=24 / ticks_per_day)
    for day_index in range(days):
        today = start + timedelta(days=day_index)
        clock.set(datetime.combine(today, datetime.min.time()))
        # The club's nightly export: yesterday's renewals and today's visits, new members.
        renewed, events = [], []
        for m in club.values():
            if m.ends_on == today - timedelta(days=1):
                if rng.random() < min(0.95, 0.35 + 0.12 * m.habit):
                    length = 365 if m.plan == "annual" else 30
                    m.cycle += 1
                    new_start = today
                    m.ends_on = new_start + timedelta(days=length - 1)
                    renewed.append(MembershipIn(
                        external_id=f"{m.external_id}-{m.cycle}",
                        customer_external_id=m.external_id, plan=m.plan,
                        price=480.0 if m.plan == "annual" else 45.0, starts_on=new_start,
                        ends_on=m.ends_on))
                    events.append(EventIn(customer_external_id=m.external_id,
                                          kind="membership_renewed",
                                          occurred_at=clock.now() + timedelta(hours=7)))
                else:
                    lapses += 1
            if m.ends_on >= today and rng.random() < m.habit / 7:
                events.append(_visit(m.external_id, today, rng))
            if today.weekday() == 0:
                m.habit *= m.fade
        renewals += len(renewed)
        if renewed:
            runtime.ingestor.memberships(renewed)
        if rng.random() < 0.6:
            join(today, rng.randint(1, 3), backdate=False)
        pending = sorted(events, key=lambda e: e.occurred_at)
        for _ in range(ticks_per_day):
            now = clock.now()
            due = [e for e in pending if e.occurred_at <= now]
            pending = [e for e in pending if e.occurred_at > now]
            if due:
                runtime.ingestor.events(due)
            runtime.evaluator.tick(kind=TickKind.FULL)
            dispatcher.drain()
            ticks += 1
            clock.advance(step)
        if progress:
            progress(day_index + 1, days)

    with runtime.engine.connect() as conn:
        by_trigger = dict(conn.execute(select(Message.trigger_id, func.count())
                                       .group_by(Message.trigger_id)).all())
        by_channel = dict(conn.execute(select(Message.channel, func.count())
                                       .group_by(Message.channel)).all())
        statuses = Tally(dict(conn.execute(select(Occurrence.status, func.count())
                                           .group_by(Occurrence.status)).all()))
        stages = dict(conn.execute(select(Customer.stage, func.count())
                                   .group_by(Customer.stage)).all())
    return DemoReport(
        members=len(club), days=days, ticks=ticks, seconds=time.perf_counter() - began,
        messages_by_trigger=by_trigger, messages_by_channel=by_channel,
        held_out=statuses.get("held_out", 0), skipped=statuses.get("skipped", 0),
        stages={str(k): v for k, v in stages.items()}, renewals=renewals, lapses=lapses,
        outbox_path=outbox, database_url=settings.database_url)


def _visit(ext: str, day: date, rng: random.Random) -> EventIn:
    at = datetime.combine(day, datetime.min.time()) + timedelta(hours=rng.choice(
        [6, 7, 8, 12, 17, 18, 19, 20]), minutes=rng.randrange(60))
    return EventIn(customer_external_id=ext, kind="visit", occurred_at=at)
