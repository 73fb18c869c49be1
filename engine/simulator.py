"""The demo club's members: a seeded, deterministic simulation that lives day by day beside the
real engine.

Each simulated day: yesterday's ended cycles renew or lapse (lapsed members may come back after a
win-back), today's visits and new members are imported, then the engine ticks once on the
virtual clock and the dispatcher drains the outbox. The messages that were actually sent are read
back from the outbox, and each trigger's planted effect (`config/demo.yaml`) is added to the
renewal probability of the cycle in which the member received it. Holdout members are never sent
anything, so the effect never reaches them: the engine's holdouts recover it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NamedTuple, cast

from pydantic import BaseModel, ConfigDict, Field
from ruamel.yaml import YAML
from sqlalchemy import select

from engine.clock import FixedClock
from engine.evaluation import TickKind
from engine.ingest import ConsentIn, CustomerIn, EventIn, MembershipIn
from engine.models import Customer, Membership, Message, MessageStatus, Occurrence
from engine.runtime import Runtime

__all__ = ["DemoConfig", "Simulation", "SimulationSummary", "load_demo_config"]

RENEWED = "membership_renewed"
PRICES = {"annual": 480.0, "monthly": 45.0}
FIRST = ["Anna", "Ben", "Clara", "David", "Elif", "Felix", "Greta", "Hugo", "Ida", "Jonas",
         "Kira", "Luca", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sami", "Tara", "Umut"]
ZONES = ["Europe/Berlin"] * 8 + ["Europe/London", "America/New_York"]
WIN_BACK_DAYS = {7: "win-back", 30: "win-back-offer"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Contact(_Strict):
    phone: float = Field(0.8, ge=0, le=1)
    sms_consent: float = Field(0.75, ge=0, le=1)
    chat: float = Field(0.4, ge=0, le=1)


class Renewal(_Strict):
    base: float = 0.30
    per_weekly_visit: float = 0.10
    floor: float = Field(0.10, ge=0, le=1)
    ceiling: float = Field(0.80, ge=0, le=1)


class Comeback(_Strict):
    after_7d: float = Field(0.06, ge=0, le=1)
    after_30d: float = Field(0.05, ge=0, le=1)


class DemoConfig(_Strict):
    """`config/demo.yaml`: the club's size and habits, and the planted effect of each trigger."""

    version: int = 1
    members: int = Field(5000, gt=0)
    months: int = Field(12, gt=0)
    days: int | None = Field(None, gt=0)  # replay this many days instead of `months`
    seed: int = 7
    start: date = date(2026, 1, 5)
    tick_hour_utc: int = Field(17, ge=0, le=23)
    initial_share: float = Field(0.8, ge=0, le=1)
    annual_share: float = Field(0.45, ge=0, le=1)
    # term lengths in days; a test club may shorten the annual term to see whole cycles sooner
    plan_days: dict[str, int] = Field(default_factory=lambda: {"annual": 365, "monthly": 30})
    january_rush: float = Field(0.3, ge=0, le=1)
    backfill_days: int = Field(60, ge=0)
    contact: Contact = Field(default_factory=Contact)
    renewal: Renewal = Field(default_factory=Renewal)
    comeback: Comeback = Field(default_factory=Comeback)
    # percentage points; a number for the trigger, or {variant: points}
    effects: dict[str, float | dict[str, float]] = Field(default_factory=dict)

    @property
    def replay_days(self) -> int:
        if self.days is not None:
            return self.days
        return (_add_months(self.start, self.months) - self.start).days

    def effect(self, trigger_id: str, variant: str | None) -> float:
        """The planted effect as a probability (0.05 for 5 points)."""
        value = self.effects.get(trigger_id, 0.0)
        if isinstance(value, dict):
            value = value.get(variant or "", 0.0)
        return value / 100.0

    def planted(self) -> dict[tuple[str, str | None], float]:
        """Planted effects in points per (trigger, variant); variant None: the whole trigger."""
        out: dict[tuple[str, str | None], float] = {}
        for trigger_id, value in self.effects.items():
            if isinstance(value, dict):
                for variant, points in value.items():
                    out[(trigger_id, variant)] = points
                out[(trigger_id, None)] = sum(value.values()) / len(value)
            else:
                out[(trigger_id, None)] = value
        return out


def load_demo_config(path: Path = Path("config/demo.yaml"), **overrides: Any) -> DemoConfig:
    """Read the demo config, with keyword overrides (members=..., months=..., seed=...)."""
    data: dict[str, Any] = {}
    if path.exists():
        loaded = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        data = dict(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return DemoConfig.model_validate(data)


def _add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    year, month = day.year + month // 12, month % 12 + 1
    return date(year, month, min(day.day, 28))


@dataclass
class Member:
    external_id: str
    habit: float  # expected visits per week
    fade: float  # weekly multiplicative change of the habit
    plan: str
    starts_on: date
    ends_on: date
    cycle: int = 1
    customer_id: int = 0
    lapsed_on: date | None = None  # the last day of the cycle that was not renewed
    initial_habit: float = 0.0

    @property
    def membership_ext(self) -> str:
        return f"{self.external_id}-{self.cycle}"


@dataclass
class SimulationSummary:
    """What happened in the club, as the simulation saw it."""

    days: int
    members: int
    ticks: int
    renewals: int = 0
    lapses: int = 0
    comebacks: int = 0
    sent: int = 0
    tick_seconds: float = 0.0
    dispatch_seconds: float = 0.0
    other_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """Members of the demo club, living through `config.days` days beside a Runtime."""

    def __init__(self, config: DemoConfig, runtime: Runtime, clock: FixedClock) -> None:
        self.config = config
        self.runtime = runtime
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.members: dict[str, Member] = {}
        self.by_customer: dict[int, Member] = {}
        self.membership_ids: dict[str, int] = {}
        # membership id (the cycle) -> {trigger id: variant} of the messages that reached it
        self.received: dict[int, dict[str, str | None]] = {}
        self._memberships_seen = 0
        self._customers_seen = 0
        self._sent_until = datetime.min

    # one day ----------------------------------------------------------------------------------

    def run(self, progress: Callable[[int, int], None] | None = None) -> SimulationSummary:
        """Replay every day: club life, one tick, dispatch, read back what was sent."""
        import time as _time

        started = _time.perf_counter()
        cfg = self.config
        days = cfg.replay_days
        summary = SimulationSummary(days=days, members=0, ticks=0)
        dispatcher = self.runtime.dispatcher(concurrency=256)
        initial = round(cfg.members * cfg.initial_share)
        later = cfg.members - initial
        self._join(cfg.start, initial, backdate=True)
        joined = 0
        for index in range(days):
            today = cfg.start + timedelta(days=index)
            self.clock.set(datetime.combine(today, time()))
            memberships, events = self._renewals(today, summary)
            # spread evenly, in whole members, the last of them on the last day
            joining = later * (index + 1) // days - joined
            joined += joining
            events.extend(self._visits(today))
            if memberships:
                self.runtime.ingestor.memberships(memberships)
            if joining:
                self._join(today, joining, backdate=False)
            if events:
                self.runtime.ingestor.events(sorted(events, key=lambda e: e.occurred_at))
            self._learn_ids()
            self.clock.set(datetime.combine(today, time(cfg.tick_hour_utc)))
            began = _time.perf_counter()
            self.runtime.evaluator.tick(kind=TickKind.FULL)
            summary.tick_seconds += _time.perf_counter() - began
            began = _time.perf_counter()
            dispatcher.drain(batch_size=2000)
            summary.dispatch_seconds += _time.perf_counter() - began
            summary.sent += self._read_sent()
            summary.ticks += 1
            if progress:
                progress(index + 1, days)
        dispatcher.close()
        summary.members = len(self.members)
        summary.other_seconds = _time.perf_counter() - started - summary.tick_seconds \
            - summary.dispatch_seconds
        return summary

    def _renewals(self, today: date, summary: SimulationSummary
                  ) -> tuple[list[MembershipIn], list[EventIn]]:
        """Cycles that ended yesterday renew or lapse; lapsed members may come back."""
        cfg = self.config
        rng = self.rng
        yesterday = today - timedelta(days=1)
        memberships: list[MembershipIn] = []
        events: list[EventIn] = []
        at = datetime.combine(today, time(7))
        for m in self.members.values():
            if m.lapsed_on is None and m.ends_on == yesterday:
                mid = self.membership_ids.get(m.membership_ext, 0)
                r = cfg.renewal
                p = min(r.ceiling, max(r.floor, r.base + r.per_weekly_visit * m.habit))
                p += sum(cfg.effect(trigger_id, variant)
                         for trigger_id, variant in self.received.get(mid, {}).items())
                if rng.random() < _clip(p):
                    summary.renewals += 1
                    memberships.append(self._next_cycle(m, today))
                    events.append(EventIn(customer_external_id=m.external_id, kind=RENEWED,
                                          occurred_at=at))
                else:
                    summary.lapses += 1
                    m.lapsed_on = yesterday
            elif m.lapsed_on is not None:
                waited = (today - m.lapsed_on).days - 1
                trigger_id = WIN_BACK_DAYS.get(waited)
                if trigger_id is None:
                    continue
                mid = self.membership_ids.get(m.membership_ext, 0)
                base = cfg.comeback.after_7d if waited == 7 else cfg.comeback.after_30d
                got = self.received.get(mid, {})
                if trigger_id in got:
                    base += cfg.effect(trigger_id, got[trigger_id])
                if rng.random() < _clip(base):
                    summary.comebacks += 1
                    m.lapsed_on = None
                    m.habit = max(0.5, m.initial_habit * 0.8)
                    memberships.append(self._next_cycle(m, today))
                    events.append(EventIn(customer_external_id=m.external_id, kind=RENEWED,
                                          occurred_at=at))
        return memberships, events

    def _next_cycle(self, m: Member, today: date) -> MembershipIn:
        m.cycle += 1
        m.starts_on = today
        m.ends_on = today + timedelta(days=self.config.plan_days[m.plan] - 1)
        return MembershipIn(external_id=m.membership_ext, customer_external_id=m.external_id,
                            plan=m.plan, price=PRICES[m.plan], starts_on=m.starts_on,
                            ends_on=m.ends_on)

    def _visits(self, today: date) -> list[EventIn]:
        out = []
        monday = today.weekday() == 0
        for m in self.members.values():
            if m.lapsed_on is not None or m.ends_on < today or m.starts_on > today:
                continue
            if monday:
                m.habit *= m.fade
            if self.rng.random() < m.habit / 7:
                out.append(self._visit(m.external_id, today))
        return out

    def _visit(self, ext: str, day: date) -> EventIn:
        # Visits land before the day's tick, so each tick sees the whole day.
        hour = self.rng.choice([6, 7, 8, 9, 11, 12, 15, 16, 17])
        at = datetime.combine(day, time(min(hour, self.config.tick_hour_utc - 1)))
        return _visit_row(ext, at + timedelta(minutes=self.rng.randrange(60)))

    # new members --------------------------------------------------------------------------------

    def _join(self, today: date, n: int, *, backdate: bool) -> None:
        cfg = self.config
        rng = self.rng
        customers, memberships, visits, consents = [], [], [], []
        for _ in range(n):
            i = len(self.members) + 1
            ext = f"M{i:05d}"
            plan = "annual" if rng.random() < cfg.annual_share else "monthly"
            length = cfg.plan_days[plan]
            offset = 0
            if backdate:
                rush = plan == "annual" and rng.random() < cfg.january_rush
                offset = rng.randrange(1, 29) if rush else rng.randrange(length)
            starts = today - timedelta(days=offset)
            habit = max(0.2, rng.gauss(2.4, 1.2))
            member = Member(ext, habit=habit, fade=rng.choice([1.0, 1.0, 0.97, 0.93, 0.85]),
                            plan=plan, starts_on=starts,
                            ends_on=starts + timedelta(days=length - 1), initial_habit=habit)
            self.members[ext] = member
            name = rng.choice(FIRST)
            phone = f"+49151{i:08d}" if rng.random() < cfg.contact.phone else None
            chat = str(700000 + i) if rng.random() < cfg.contact.chat else None
            customers.append(CustomerIn(
                external_id=ext, first_name=name, email=f"{name.lower()}.{i}@example.com",
                phone=phone, chat_id=chat, timezone=rng.choice(ZONES),
                segment=rng.choice("AABBBCCCCC"), locale="de-DE"))
            memberships.append(MembershipIn(
                external_id=member.membership_ext, customer_external_id=ext, plan=plan,
                price=PRICES[plan], starts_on=starts, ends_on=member.ends_on))
            signed = datetime.combine(starts, time(9))
            if phone and rng.random() < cfg.contact.sms_consent:
                consents.append(ConsentIn(customer_external_id=ext, channel="sms", granted=True,
                                          occurred_at=signed, source="signup_form"))
            if chat:
                consents.append(ConsentIn(customer_external_id=ext, channel="chat", granted=True,
                                          occurred_at=signed, source="signup_form"))
            if backdate:
                day = max(starts, today - timedelta(days=cfg.backfill_days))
                while day < today:
                    if rng.random() < habit / 7:
                        visits.append(self._visit(ext, day))
                    day += timedelta(days=1)
        ingestor = self.runtime.ingestor
        ingestor.customers(customers)
        ingestor.memberships(memberships)
        if consents:
            ingestor.consents(consents)
        if visits:
            ingestor.events(sorted(visits, key=lambda e: e.occurred_at))

    # reading the engine back ---------------------------------------------------------------------

    def _learn_ids(self) -> None:
        """Database ids of new customers and memberships (ids only grow)."""
        with self.runtime.engine.connect() as conn:
            for cid, ext in conn.execute(select(Customer.id, Customer.external_id)
                                         .where(Customer.id > self._customers_seen)):
                self.members[ext].customer_id = cid
                self.by_customer[cid] = self.members[ext]
                self._customers_seen = max(self._customers_seen, cid)
            for mid, ext in conn.execute(select(Membership.id, Membership.external_id)
                                         .where(Membership.id > self._memberships_seen)):
                self.membership_ids[ext] = mid
                self._memberships_seen = max(self._memberships_seen, mid)

    def _read_sent(self) -> int:
        """Record the messages the dispatcher sent since the previous read."""
        now = self.clock.now()
        with self.runtime.engine.connect() as conn:
            rows = conn.execute(
                select(Occurrence.trigger_id, Occurrence.membership_id, Occurrence.variant)
                .join(Message, Message.occurrence_id == Occurrence.id)
                .where(Message.status.in_([MessageStatus.SENT, MessageStatus.DELIVERED]),
                       Message.sent_at > self._sent_until, Message.sent_at <= now)).all()
        self._sent_until = now
        for trigger_id, membership_id, variant in rows:
            if membership_id is not None:
                self.received.setdefault(membership_id, {}).setdefault(trigger_id, variant)
        return len(rows)


class _VisitRow(NamedTuple):
    """The fields of an EventIn that ingestion reads, without pydantic's per-row cost: visits
    are the simulation's hottest rows (hundreds of thousands a year) and are valid by
    construction."""

    customer_external_id: str
    occurred_at: datetime
    kind: str = "visit"
    external_id: str | None = None
    properties: dict[str, Any] = {}  # shared, never mutated


def _visit_row(ext: str, at: datetime) -> EventIn:
    return cast(EventIn, _VisitRow(ext, at))


def _clip(p: float) -> float:
    return min(0.99, max(0.0, p))
