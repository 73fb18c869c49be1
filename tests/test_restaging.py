"""A full tick recomputes only the stages that may have changed since the previous full tick;
whatever the clock does and whatever is ingested between ticks, every stored stage must equal
the stage computed from scratch, on every backend."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from engine.clock import FixedClock
from engine.config import LifecycleFile, ProjectConfig
from engine.db import read_counter
from engine.evaluation import Evaluator, TickKind
from engine.explain import load_facts
from engine.ingest import CustomerIn, EventIn, Ingestor, MembershipIn
from engine.lifecycle import Lifecycle
from engine.models import Customer
from tests.conftest import empty_club, ingest_step

START = datetime(2026, 3, 28, 20, 0)  # Europe's summer time begins that night
ZONES = [None, "America/Los_Angeles", "Asia/Tokyo", "Europe/Berlin", "Pacific/Kiritimati"]


# Dates and visits gather around the constants of config/lifecycle.yaml (28, 30 and 45 days),
# where a few hours decide the stage.
near = st.integers(-3, 3)


@st.composite
def member(draw: st.DrawFn) -> dict[str, Any]:
    today = START.date()
    length = timedelta(days=draw(st.integers(0, 400)))
    if draw(st.booleans()):
        offsets = st.integers(-420, 10) | near | near.map(lambda d: d - 28)
        start = today + timedelta(days=draw(offsets))
        end = start + length
    else:
        end = today + timedelta(days=draw(near | near.map(lambda d: d + 30)))
        start = end - length
    return {
        "timezone": draw(st.sampled_from(ZONES)),
        "membership": draw(st.none() | st.fixed_dictionaries({
            "starts_on": st.just(start), "ends_on": st.just(end),
            "status": st.sampled_from(["active", "active", "cancelled"]),
        })),
        "visits": draw(st.lists(st.integers(-90 * 24, 0) | st.integers(-47 * 24, -44 * 24),
                                max_size=4)),
    }


# A step: move the clock by some minutes or hours (sometimes backwards), maybe ingest something
# first. Minutes: full ticks a minute apart restage only the counts that crossed in that minute.
step = st.tuples(st.integers(-30 * 60, 80 * 60) | st.integers(-90, 90),
                 st.sampled_from(["none", "visit", "renew"]), st.integers(0, 5), st.booleans())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(members=st.lists(member(), min_size=1, max_size=6),
       steps=st.lists(step, min_size=1, max_size=6), club_zone_only=st.booleans())
def test_restricted_full_ticks_keep_every_stage_exact(
        db: Engine, project_config: ProjectConfig, members: list[dict[str, Any]],
        steps: list[tuple[int, str, int, bool]], club_zone_only: bool) -> None:
    """`club_zone_only`: every customer in the club's zone, so that the zones share one local
    date and the restaged anchor dates are exactly those of the crossed steps (across zones a
    day or two wider, which would hide a step read one day off)."""
    empty_club(db)
    clock = FixedClock(START)
    ing = Ingestor(db, clock)
    ing.customers([CustomerIn(external_id=f"c{i}",
                              timezone=None if club_zone_only else m["timezone"])
                   for i, m in enumerate(members)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  **m["membership"])
                     for i, m in enumerate(members) if m["membership"]])
    ing.events([EventIn(customer_external_id=f"c{i}", kind="visit",
                        occurred_at=START + timedelta(hours=h))
                for i, m in enumerate(members) for h in m["visits"]])
    evaluator = Evaluator(db, project_config, [], clock)
    evaluator.tick()
    for minutes, ingest, who, incremental in steps:
        clock.advance(timedelta(minutes=minutes))
        target = f"c{who % len(members)}"
        ingest_step(ing, clock.now(), ingest, target, renewal=timedelta(days=180))
        evaluator.tick(kind=TickKind.INCREMENTAL if incremental else TickKind.FULL)
        if not incremental:
            _assert_exact(db, project_config, clock.now())


def _assert_exact(db: Engine, config: ProjectConfig, now: datetime) -> None:
    lifecycle = Lifecycle(config.lifecycle)
    with db.connect() as conn:
        rows = conn.execute(select(Customer.id, Customer.stage, Customer.stage_membership_id,
                                   Customer.current_membership_id)).all()
        for cid, stage, stage_membership, current in rows:
            facts = load_facts(conn, cid, now, config.club.timezone)
            assert (stage, stage_membership) == (lifecycle.stage_py(facts), current), (cid, now)


def test_conditions_beyond_day_counts_recompute_everyone() -> None:
    """A windowed count or the stage itself in a stage condition cannot be bounded by dates."""
    def lifecycle(*conditions: str) -> Lifecycle:
        return Lifecycle(LifecycleFile.model_validate({"version": 1, "stages": [
            {"id": "busy", "conditions": list(conditions)}, {"id": "rest"}]}))

    then, now = START, START + timedelta(days=1)
    assert lifecycle("visits_30d >= 4").may_have_changed(then, now, ["UTC"], 0) is None
    assert lifecycle('stage == "busy"').may_have_changed(then, now, ["UTC"], 0) is None
    assert lifecycle("days_in_stage < 3").may_have_changed(then, now, ["UTC"], 0) is None
    assert lifecycle("days_until_membership_end in [1, 7]",
                     "not days_since_last_visit > 3.5").watches is not None
    assert lifecycle('plan == "annual"').may_have_changed(then, now, ["UTC"], 0) is not None


def _boundary_members(db: Engine, clock: FixedClock) -> None:
    """One member per boundary of config/lifecycle.yaml, each a few hours before crossing it."""
    today = START.date()
    ing = Ingestor(db, clock)
    long_ago, far = today - timedelta(days=200), today + timedelta(days=200)
    members = {  # external id: (starts_on, ends_on, last visit)
        "leaves-onboarding": (today - timedelta(days=27), far, START),
        "renewal-comes-due": (long_ago, today + timedelta(days=31), START),
        "membership-ends": (long_ago, today, START),
        "goes-quiet": (long_ago, far, START - timedelta(days=45, hours=12)),
    }
    ing.customers([CustomerIn(external_id=x) for x in members])
    ing.memberships([MembershipIn(external_id=f"m-{x}", customer_external_id=x, starts_on=s,
                                  ends_on=e) for x, (s, e, _) in members.items()])
    ing.events([EventIn(customer_external_id=x, kind="visit", occurred_at=v)
                for x, (_, _, v) in members.items()])


def test_each_boundary_of_the_lifecycle_is_crossed_by_a_restricted_tick(
        db: Engine, project_config: ProjectConfig) -> None:
    clock = FixedClock(START)
    _boundary_members(db, clock)
    evaluator = Evaluator(db, project_config, [], clock)
    evaluator.tick()
    before = _stages(db)
    clock.advance(timedelta(hours=24))
    assert evaluator.tick().stage_changes == 4
    assert (before, _stages(db)) == (
        {"leaves-onboarding": "onboarding", "renewal-comes-due": "active",
         "membership-ends": "renewal_due", "goes-quiet": "active"},
        {"leaves-onboarding": "active", "renewal-comes-due": "renewal_due",
         "membership-ends": "lapsed", "goes-quiet": "lapsed"})
    _assert_exact(db, project_config, clock.now())


def test_full_ticks_a_minute_apart_restage_only_what_crossed_in_that_minute(
        db: Engine, project_config: ProjectConfig) -> None:
    """The scheduler's full ticks come a minute apart: between two of them a timestamp count
    moves for the customers whose day boundary fell in that minute, and a local-date count only
    where the local date changed."""
    clock = FixedClock(START)
    _boundary_members(db, clock)
    Evaluator(db, project_config, [], clock).tick()
    lifecycle = Lifecycle(project_config.lifecycle)
    zone = project_config.club.timezone
    with db.connect() as conn:
        seq = read_counter(conn, "change")

    def restaged(then: datetime, now: datetime) -> set[str]:
        ids = lifecycle.may_have_changed(then, now, [zone], seq)
        assert ids is not None
        with db.connect() as conn:
            return set(conn.execute(select(Customer.external_id)
                                    .where(Customer.id.in_(ids))).scalars())

    minute = timedelta(minutes=1)
    assert restaged(START, START + minute) == set()
    # the last visit was 45 days and 12 hours ago: the 46th day since it begins in 12 hours
    crossing = START + timedelta(hours=12)
    assert restaged(crossing - minute, crossing + minute) == {"goes-quiet"}
    assert restaged(crossing + minute, crossing + 2 * minute) == set()
    # the next local midnight moves every membership day count
    midnight = datetime.combine(START.date() + timedelta(days=1), time(),
                                ZoneInfo(zone)).astimezone(UTC).replace(tzinfo=None)
    assert restaged(midnight - minute, midnight - minute / 2) == set()
    assert restaged(midnight - minute, midnight + minute) == {
        "leaves-onboarding", "renewal-comes-due", "membership-ends"}


def _stages(db: Engine) -> dict[str, str | None]:
    with db.connect() as conn:
        return dict(conn.execute(select(Customer.external_id, Customer.stage)).all())
