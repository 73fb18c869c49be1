"""Backtest: replay the stored history with a set of rule files on a virtual clock, into a scratch
database, and report what would have been sent, day by day and per trigger. Nothing is sent: no
dispatcher runs, and the source database is only read.

The scratch database is rebuilt through the ingestion path, in the order and at the instants the
club's data arrived (customers and memberships by `created_at`, events by `received_at`, consent
entries with their customer or when given), so that every tick sees what a live tick saw then, and
customers and memberships get the same ids (hence the same holdout and variant buckets). Ticks
run at the instants of the stored ticks in the range, or once a day at `hour` if there are none.

History before `start` is ingested before the first tick, but contacts made before it are not:
re-entry scopes and caps see only the backtest's own messages, so counts are exact when `start` is
the beginning of the history.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from engine.clock import FixedClock
from engine.db import make_engine
from engine.evaluation import TickKind
from engine.ingest import ConsentIn, CustomerIn, EventIn, MembershipIn
from engine.models import (
    ConsentEntry,
    Customer,
    Event,
    Membership,
    Occurrence,
    OccurrenceStatus,
    Tick,
    table,
)
from engine.runtime import Runtime
from engine.settings import Settings

__all__ = ["BacktestDay", "BacktestReport", "IdMismatch", "run_backtest"]


class IdMismatch(RuntimeError):
    """The scratch database numbered customers or memberships differently from the source."""


@dataclass
class BacktestDay:
    """One day and one trigger: what would have gone out, and what was stopped and why."""

    day: date
    trigger_id: str
    messages: int = 0
    channels: dict[str, int] = field(default_factory=dict)
    held_out: int = 0
    stopped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"day": self.day.isoformat(), "trigger": self.trigger_id,
                "messages": self.messages, "channels": self.channels,
                "held_out": self.held_out, "stopped": self.stopped}


@dataclass
class BacktestReport:
    start: date
    end: date
    rules_dir: Path
    ticks: int
    days: list[BacktestDay]
    scratch_url: str

    def per_trigger(self) -> dict[str, int]:
        """Messages that would have gone out, per trigger, over the whole range."""
        out: dict[str, int] = defaultdict(int)
        for d in self.days:
            out[d.trigger_id] += d.messages
        return dict(sorted(out.items()))

    def totals(self) -> dict[str, BacktestDay]:
        """Per trigger over the whole range (the `day` is the first day)."""
        out: dict[str, BacktestDay] = {}
        for d in self.days:
            t = out.setdefault(d.trigger_id, BacktestDay(self.start, d.trigger_id))
            t.messages += d.messages
            t.held_out += d.held_out
            for k, v in d.channels.items():
                t.channels[k] = t.channels.get(k, 0) + v
            for k, v in d.stopped.items():
                t.stopped[k] = t.stopped.get(k, 0) + v
        return dict(sorted(out.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(),
                "rules": str(self.rules_dir), "ticks": self.ticks,
                "per_trigger": {k: v.as_dict() for k, v in self.totals().items()},
                "days": [d.as_dict() for d in self.days]}


def reason_kind(reason: str | None) -> str:
    """The policy that stopped an occurrence, from its recorded reason:
    `frequency_cap 1 per 1d` -> frequency_cap, `no_consent (sms); ...` -> no_consent."""
    if not reason:
        return "unknown"
    first = reason.split(";")[0].strip()
    for sep in (" ", ":", "("):
        first = first.split(sep)[0]
    return first or "unknown"


def _instants(source: Engine, start: date, end: date, hour: int) -> list[datetime]:
    lo = datetime.combine(start, time())
    hi = datetime.combine(end + timedelta(days=1), time())
    with source.connect() as conn:
        stored = [row[0] for row in conn.execute(
            select(Tick.now).where(Tick.dry_run.is_(False), Tick.now >= lo, Tick.now < hi)
            .order_by(Tick.now))]
    if stored:
        return list(dict.fromkeys(stored))
    return [datetime.combine(start + timedelta(days=i), time(hour))
            for i in range((end - start).days + 1)]


class _History:
    """The source's rows in arrival order, handed out up to an instant."""

    def __init__(self, source: Engine) -> None:
        c, m, e, k = table(Customer), table(Membership), table(Event), table(ConsentEntry)
        with source.connect() as conn:
            self.customers = conn.execute(select(c).order_by(c.c.id)).mappings().all()
            ext = {r["id"]: r["external_id"] for r in self.customers}
            created = {r["id"]: r["created_at"] for r in self.customers}
            self.memberships = conn.execute(select(m).order_by(m.c.id)).mappings().all()
            self.events = conn.execute(select(e).order_by(e.c.id)).mappings().all()
            consents = conn.execute(select(k).order_by(k.c.id)).mappings().all()
        self.ext = ext
        self.consents = sorted(
            consents, key=lambda r: (max(r["occurred_at"], created[r["customer_id"]]), r["id"]))
        self.created = created
        self._pos = {"customers": 0, "memberships": 0, "events": 0, "consents": 0}

    def _take(self, name: str, rows: Any, until: datetime,
              at: Callable[[Any], datetime]) -> Iterator[Any]:
        i = self._pos[name]
        while i < len(rows) and at(rows[i]) <= until:
            yield rows[i]
            i += 1
        self._pos[name] = i

    def feed(self, runtime: Runtime, until: datetime) -> None:
        ing = runtime.ingestor
        customers = [CustomerIn(
            external_id=r["external_id"], first_name=r["first_name"], last_name=r["last_name"],
            email=r["email"], phone=r["phone"], chat_id=r["chat_id"], timezone=r["timezone"],
            locale=r["locale"], segment=r["segment"], attributes=r["attributes"] or {})
            for r in self._take("customers", self.customers, until, lambda r: r["created_at"])]
        if customers:
            ing.customers(customers)
        memberships = [MembershipIn(
            external_id=r["external_id"], customer_external_id=self.ext[r["customer_id"]],
            plan=r["plan"], price=r["price"], starts_on=r["starts_on"], ends_on=r["ends_on"],
            status=r["status"])
            for r in self._take("memberships", self.memberships, until,
                                lambda r: r["created_at"])]
        if memberships:
            ing.memberships(memberships)
        consents = [ConsentIn(
            customer_external_id=self.ext[r["customer_id"]], channel=r["channel"],
            purpose=r["purpose"], granted=r["granted"], occurred_at=r["occurred_at"],
            source=r["source"], wording_version=r["wording_version"])
            for r in self._take("consents", self.consents, until,
                                lambda r: max(r["occurred_at"], self.created[r["customer_id"]]))]
        if consents:
            ing.consents(consents)
        events = [EventIn.model_construct(
            external_id=r["external_id"], customer_external_id=self.ext[r["customer_id"]],
            kind=r["kind"], occurred_at=r["occurred_at"], properties=r["properties"] or {})
            for r in self._take("events", self.events, until, lambda r: r["received_at"])]
        if events:
            ing.events(events)


def _check_ids(history: _History, scratch: Engine) -> None:
    c, m = table(Customer), table(Membership)
    with scratch.connect() as conn:
        got_c = dict(conn.execute(select(c.c.external_id, c.c.id)).all())
        got_m = dict(conn.execute(select(m.c.external_id, m.c.id)).all())
    for row in history.customers:
        if row["external_id"] in got_c and got_c[row["external_id"]] != row["id"]:
            raise IdMismatch(f"customer {row['external_id']}: id {got_c[row['external_id']]} "
                             f"in the scratch database, {row['id']} in the source")
    for row in history.memberships:
        if row["external_id"] in got_m and got_m[row["external_id"]] != row["id"]:
            raise IdMismatch(f"membership {row['external_id']}: different ids")


def run_backtest(settings: Settings, start: date, end: date, *, rules_dir: Path | None = None,
                 scratch: Path | None = None, hour: int = 17,
                 progress: Callable[[int, int], None] | None = None) -> BacktestReport:
    """Replay [start, end] of the database named by `settings` with the rules in `rules_dir`
    (default: the settings' rules) into a scratch SQLite database; report per day and trigger."""
    rules_dir = rules_dir or settings.rules_dir
    source = make_engine(settings.database_url)
    history = _History(source)
    instants = _instants(source, start, end, hour)
    source.dispose()
    if scratch is None:
        scratch = Path(tempfile.mkdtemp(prefix="touchpoints-backtest-")) / "scratch.db"
    for stale in (scratch, Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
        stale.unlink(missing_ok=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    clock = FixedClock(instants[0] if instants else datetime.combine(start, time()))
    scratch_settings = settings.model_copy(update={
        "database_url": f"sqlite:///{scratch}", "rules_dir": rules_dir,
        "console_outbox_path": None})
    runtime = Runtime.load(scratch_settings, clock)
    for i, instant in enumerate(instants):
        clock.set(instant)
        history.feed(runtime, instant)
        # a real tick of the scratch database, so that re-entry scopes and caps carry over from
        # day to day; no dispatcher ever reads its outbox
        runtime.evaluator.tick(kind=TickKind.FULL)
        if progress:
            progress(i + 1, len(instants))
    _check_ids(history, runtime.engine)
    days = _summarise(runtime.engine)
    runtime.engine.dispose()
    return BacktestReport(start, end, rules_dir, len(instants), days, f"sqlite:///{scratch}")


def _summarise(engine: Engine) -> list[BacktestDay]:
    o = table(Occurrence)
    day = func.date(o.c.fired_at)
    out: dict[tuple[str, str], BacktestDay] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(day, o.c.trigger_id, o.c.status, o.c.channel, o.c.reason, func.count())
            .group_by(day, o.c.trigger_id, o.c.status, o.c.channel, o.c.reason)).all()
    for d, trigger_id, status, channel, reason, n in rows:
        item = out.setdefault((str(d), trigger_id),
                              BacktestDay(date.fromisoformat(str(d)), trigger_id))
        if status == OccurrenceStatus.MESSAGE:
            item.messages += n
            item.channels[channel] = item.channels.get(channel, 0) + n
        elif status == OccurrenceStatus.HELD_OUT:
            item.held_out += n
        else:
            kind = reason_kind(reason)
            item.stopped[kind] = item.stopped.get(kind, 0) + n
    return [out[k] for k in sorted(out)]
