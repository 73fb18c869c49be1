"""A full tick re-reads a date or schedule trigger's due customers only where something may have
changed since the previous full tick evaluated the same slot. Whatever the clock does and
whatever is ingested between ticks, it must fire exactly what a tick reading every due customer
fires, on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, update

from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.db import make_engine, migrate
from engine.drift import Drift
from engine.evaluation import Evaluator, TickKind
from engine.ingest import CustomerIn, EventIn, Ingestor, MembershipIn
from engine.models import (
    Customer,
    Membership,
    Occurrence,
)
from tests.conftest import Loaded, empty_club, ingest_step, make_trigger

# Ten minutes before midnight in Berlin (the club's zone), the night Europe's summer time begins:
# the first steps cross the local dates, the stages they move and the hourly slots.
START = datetime(2026, 3, 28, 22, 50)
ZONES = [None, "America/Los_Angeles", "Asia/Tokyo", "Europe/Berlin", "Pacific/Kiritimati"]

# Every kind of slot (a firing date, schedules from every 20 minutes to daily) and of scope, with
# conditions on each kind of name: timeless ones (read again only when ingestion marks the
# customer changed), the stage (moved by the tick itself), windowed counts gaining and losing
# events, day counts compared with constants, and `days_in_stage` (not bounded: always read in
# full). `every: 90m` on an hourly slot lets a customer fired in one slot go free in the middle
# of the next.
TRIGGERS = [
    {"id": "after-start", "when": {"after": "membership.starts_at", "days": 2, "at": "21:15"},
     "conditions": ["visits_7d >= 1"], "once": "per_cycle"},
    {"id": "before-end", "stage": ["active", "renewal_due"],
     "when": {"before": "membership.ends_at", "days": 1, "at": "08:00"},
     "conditions": ["days_since_last_visit > 2 or days_since_last_visit is None"],
     "once": "ever"},
    {"id": "hourly-quiet", "when": {"schedule": "0 * * * *"},
     "conditions": ["visits_1d == 0"], "once": "per_event"},
    {"id": "hourly-regular", "when": {"schedule": "0 * * * *"},
     "conditions": ["visits_total >= 2"], "once": "per_event"},
    {"id": "hourly-member", "when": {"schedule": "0 * * * *"},
     "conditions": ["has_membership"], "once": {"every": "90m"}},
    {"id": "noon-lapsed", "stage": "lapsed", "when": {"schedule": "0 12 * * *"},
     "once": "per_event"},
    {"id": "three-hourly", "when": {"schedule": "0 */3 * * *"},
     "conditions": ["visits_2d < 2", 'stage != "lapsed"'], "once": "per_event"},
    {"id": "daily", "when": {"schedule": "30 9 * * *"},
     "conditions": ["days_since_last_visit == 1"], "once": {"every": "1d"}},
    {"id": "twenty-minutes", "when": {"schedule": "*/20 * * * *"},
     "conditions": ["days_until_membership_end >= 0"], "once": {"every": "1h"}},
    {"id": "settling-in", "when": {"schedule": "15 * * * *"},
     "conditions": ["days_in_stage >= 1"], "once": {"every": "2h"}},
]


def _triggers() -> list[Loaded]:
    return [make_trigger(**t) for t in TRIGGERS]


@st.composite
def member(draw: st.DrawFn) -> dict[str, Any]:
    today = START.date()
    start = today + timedelta(days=draw(st.integers(-4, 0)))
    end = today + timedelta(days=draw(st.integers(0, 3)))
    return {
        "timezone": draw(st.sampled_from(ZONES)),
        "membership": draw(st.none() | st.just({"starts_on": start, "ends_on": end})),
        # visits that leave the 1, 2 and 7-day windows and cross the day counts within the
        # first steps, and some ahead of the clock (recorded before they count)
        "visits": draw(st.lists(st.tuples(st.sampled_from([0, 1, 2, 7]), st.integers(-60, 90)),
                                max_size=4)),
    }


# A step: move the clock by minutes (mostly) or hours, sometimes backwards; maybe ingest
# something first; a full or an incremental tick.
step = st.tuples(st.integers(1, 25) | st.integers(1, 25) | st.integers(-30, 90)
                 | st.integers(60, 30 * 60),
                 st.sampled_from(["none", "none", "visit", "renew"]), st.integers(0, 5),
                 st.booleans())


def _fired(db: Engine) -> set[tuple[str, str, str]]:
    """(customer, trigger, scope) of every occurrence, a cycle named by its membership's
    external id (the two databases number their rows differently)."""
    with db.connect() as conn:
        rows = conn.execute(
            select(Customer.external_id, Occurrence.trigger_id, Occurrence.scope_key,
                   Membership.external_id)
            .join(Customer, Customer.id == Occurrence.customer_id)
            .outerjoin(Membership, Membership.id == Occurrence.membership_id))
        return {(who, trigger, f"cycle:{cycle}" if scope.startswith("cycle:") else scope)
                for who, trigger, scope, cycle in rows}


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Engine]:
    """A second database, ticked by an evaluator that reads every due customer."""
    engine = make_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(members=st.lists(member(), min_size=1, max_size=6),
       steps=st.lists(step, min_size=1, max_size=8))
def test_settled_full_ticks_fire_what_reading_everyone_fires(
        db: Engine, plain: Engine, project_config: ProjectConfig,
        members: list[dict[str, Any]], steps: list[tuple[int, str, int, bool]]) -> None:
    empty_club(db, plain)
    clock = FixedClock(START)
    evaluators = [Evaluator(db, project_config, _triggers(), clock),
                  Evaluator(plain, project_config, _triggers(), clock, settle=False)]
    ingestors = [Ingestor(db, clock), Ingestor(plain, clock)]
    for ing in ingestors:
        ing.customers([CustomerIn(external_id=f"c{i}", timezone=m["timezone"])
                       for i, m in enumerate(members)])
        ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                      **m["membership"])
                         for i, m in enumerate(members) if m["membership"]])
        ing.events([EventIn(customer_external_id=f"c{i}", kind="visit",
                            occurred_at=START - timedelta(days=days, minutes=-minutes))
                    for i, m in enumerate(members) for days, minutes in m["visits"]])
    for evaluator in evaluators:
        evaluator.tick()
    assert _fired(db) == _fired(plain)
    for minutes, ingest, who, incremental in steps:
        clock.advance(timedelta(minutes=minutes))
        target = f"c{who % len(members)}"
        for ing in ingestors:
            ingest_step(ing, clock.now(), ingest, target, renewal=timedelta(days=2))
        kind = TickKind.INCREMENTAL if incremental else TickKind.FULL
        for evaluator in evaluators:
            evaluator.tick(kind=kind)
        assert _fired(db) == _fired(plain), (clock.now(), kind)


def test_a_settled_slot_is_read_again_only_for_what_changed(
        db: Engine, project_config: ProjectConfig) -> None:
    """Within a slot, a full tick passes over the customers the previous one passed over unless
    they changed: a change written behind ingestion's back (no `change_seq`) goes unseen until
    the slot turns, and one ingested is seen at once."""
    clock = FixedClock(datetime(2026, 3, 2, 9, 0))  # a Monday
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id=x, timezone="UTC") for x in ("quiet", "ingested")])
    trigger = make_trigger(id="hourly", when={"schedule": "0 * * * *"},
                           conditions=["visits_total >= 1"], once="per_event")
    evaluator = Evaluator(db, project_config, [trigger], clock)
    evaluator.tick()
    assert _fired(db) == set()
    clock.advance(timedelta(minutes=1))
    with db.begin() as conn:  # not through ingestion: nothing marks the customer changed
        conn.execute(update(Customer).where(Customer.external_id == "quiet")
                     .values(visit_count=1))
    ing.events([EventIn(customer_external_id="ingested", kind="visit", occurred_at=clock.now())])
    evaluator.tick()
    assert _fired(db) == {("ingested", "hourly", "slot:2026-03-02T09:00")}
    # a tick that reads every due customer sees the unmarked change in the same slot
    Evaluator(db, project_config, [trigger], clock, settle=False).tick()
    assert ("quiet", "hourly", "slot:2026-03-02T09:00") in _fired(db)
    # and so does the settled one in the next slot
    clock.advance(timedelta(hours=1))
    evaluator.tick()
    assert ("quiet", "hourly", "slot:2026-03-02T10:00") in _fired(db)


def test_drift_bounds_windows_and_day_counts_against_constants_only() -> None:
    bounded = Drift.of(["visits_30d >= 4 and days_since_last_visit in [3, 10]",
                        "days_until_membership_end < 7 or plan == \"annual\""])
    assert bounded is not None
    assert bounded.windows == {("visit", 30)}
    # the steps b (between b - 1 and b) at which a comparison can flip: an equality at both
    # ends of its constant, `< 7` only where the count reaches 7
    assert {(d.clocked.column, d.steps) for d in bounded.day_counts} == {
        ("last_visit_at", frozenset({3, 4, 10, 11})), ("ends_on", frozenset({7}))}
    # a constant on the left reads from the count's side: `0 <= n` is `n >= 0`, `5.5 < n` is
    # `n > 5.5`
    chained = Drift.of(["0 <= days_since_membership_start < 28", "5.5 < days_since_last_visit",
                        "not days_until_membership_end <= 30"])
    assert chained is not None
    assert {(d.clocked.column, d.steps) for d in chained.day_counts} == {
        ("starts_on", frozenset({0, 28})), ("last_visit_at", frozenset({6})),
        ("ends_on", frozenset({31}))}
    assert Drift.of(["days_in_stage > 3"]) is None
    assert Drift.of(["days_since_last_visit > visits_total"]) is None
    assert Drift.of(["visits_7d > 1"], windows=False) is None
    assert Drift.of(['stage == "active"'], unbounded=frozenset({"stage"})) is None


def test_a_window_moves_for_the_events_entering_and_leaving_it(
        db: Engine, clock: FixedClock) -> None:
    """Between two instants a minute apart, `visits_7d` changes only for the customers with a
    visit in that minute, or in the same minute a week earlier."""
    now = clock.now()
    minute = timedelta(minutes=1)
    ing = Ingestor(db, clock)
    visits = {"leaving": now - timedelta(days=7) + minute / 2, "entering": now + minute / 2,
              "inside": now - timedelta(days=3), "gone": now - timedelta(days=7) - minute,
              "edge": now - timedelta(days=7)}
    ing.customers([CustomerIn(external_id=x) for x in visits])
    ing.events([EventIn(customer_external_id=x, kind="visit", occurred_at=t)
                for x, t in visits.items()])
    drift = Drift.of(["visits_7d >= 1"])
    assert drift is not None
    parts = drift.moved(now, now + minute, ["UTC"])
    assert parts is not None
    with db.connect() as conn:
        moved = {x for part in parts for x in conn.execute(
            select(Customer.external_id).where(Customer.id.in_(part))).scalars()}
    assert moved == {"leaving", "entering"}


def test_a_day_count_moves_only_at_the_steps_that_flip_its_comparison(
        db: Engine, clock: FixedClock) -> None:
    """`days_since_last_visit > 45` changes when the count goes from 45 to 46, not from 44 to
    45: between two instants a minute apart, only the customers whose 46th day began in that
    minute are read again; `== 45` changes at both steps."""
    now = clock.now()
    minute = timedelta(minutes=1)
    ing = Ingestor(db, clock)
    visits = {"to_46": now - timedelta(days=46) + minute / 2,
              "to_45": now - timedelta(days=45) + minute / 2,
              "to_44": now - timedelta(days=44) + minute / 2}
    ing.customers([CustomerIn(external_id=x) for x in visits])
    ing.events([EventIn(customer_external_id=x, kind="visit", occurred_at=t)
                for x, t in visits.items()])

    def moved(condition: str) -> set[str]:
        drift = Drift.of([condition])
        assert drift is not None
        parts = drift.moved(now, now + minute, ["UTC"])
        assert parts is not None
        with db.connect() as conn:
            return {x for part in parts for x in conn.execute(
                select(Customer.external_id).where(Customer.id.in_(part))).scalars()}

    assert moved("days_since_last_visit > 45") == {"to_46"}
    assert moved("45 < days_since_last_visit") == {"to_46"}
    assert moved("days_since_last_visit >= 45") == {"to_45"}
    assert moved("days_since_last_visit == 45") == {"to_45", "to_46"}


def test_each_kind_of_change_is_read_again_within_a_settled_slot(
        db: Engine, project_config: ProjectConfig) -> None:
    """One customer per source of change between two full ticks a quarter of an hour apart in
    the same daily slot: each is read again, and fired for, by the second tick."""
    sat = datetime(2026, 3, 28, 22, 50)  # Berlin's midnight is ten minutes later
    clock = FixedClock(sat - timedelta(hours=23, minutes=50))  # Friday 23:00, Friday's slot
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id="lapses", timezone="Europe/Berlin"),
                   *(CustomerIn(external_id=x, timezone="UTC")
                     for x in ("ingested", "window-leaves", "window-enters", "count-crosses",
                               "frees-up"))])
    ing.memberships([MembershipIn(external_id="m", customer_external_id="lapses",
                                  starts_on=sat.date() - timedelta(days=300),
                                  ends_on=sat.date())])
    five = timedelta(minutes=5)
    ing.events([EventIn(customer_external_id=x, kind="visit", occurred_at=t) for x, t in [
        ("ingested", sat - timedelta(days=30)), ("window-leaves", sat - timedelta(days=1) + five),
        ("window-enters", sat + five), ("count-crosses", sat - timedelta(days=1) + five)]])
    noon = {"schedule": "0 12 * * *"}
    triggers = [
        make_trigger(id="lapsed", stage="lapsed", when=noon, once="per_event"),
        make_trigger(id="regular", when=noon, conditions=["visits_total >= 2"],
                     once="per_event"),
        make_trigger(id="quiet-day", when=noon, once="per_event",
                     conditions=["visits_1d == 0", "visits_total >= 1"]),
        make_trigger(id="visited", when=noon, conditions=["visits_1d >= 1"], once="per_event"),
        make_trigger(id="a-day-since", when=noon, conditions=["days_since_last_visit == 1"],
                     once="per_event"),
        make_trigger(id="daily-at-most", when=noon, once={"every": "24h"},
                     conditions=['timezone == "UTC"', "visits_total == 0"]),
    ]
    evaluator = Evaluator(db, project_config, triggers, clock)
    evaluator.tick()  # Friday's slot: "frees-up" is fired for at 23:00
    clock.set(sat)
    evaluator.tick()  # Saturday's slot, read in full
    before = _fired(db)
    clock.advance(timedelta(minutes=15))
    ing.events([EventIn(customer_external_id="ingested", kind="visit", occurred_at=clock.now())])
    evaluator.tick()
    saturday = "2026-03-28T12:00"
    expected = {("lapses", "lapsed", f"slot:{saturday}"),
                ("ingested", "regular", f"slot:{saturday}"),
                ("window-leaves", "quiet-day", f"slot:{saturday}"),
                ("window-enters", "visited", f"slot:{saturday}"),
                ("count-crosses", "a-day-since", f"slot:{saturday}"),
                ("frees-up", "daily-at-most", f"at:{saturday}")}
    assert not expected & before
    assert expected <= _fired(db) - before
