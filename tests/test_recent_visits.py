"""Windowed visit counts read from the customer's latest visits (`Customer.recent_visits`): kept
by ingestion, and giving the same answers as counting the events."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select, update

from engine.clock import FixedClock
from engine.conditions import compile_condition
from engine.ingest import CustomerIn, EventIn, Ingestor, recent_visits
from engine.metrics import RowMembership, SqlContext, TickInstants
from engine.models import RECENT_VISITS, Customer, Event

NOW = datetime(2026, 3, 29, 0, 30)
EPOCH = datetime(1970, 1, 1)
OPS = ["==", "!=", "<", "<=", ">", ">="]


def _evaluate(db: Engine, conditions: list[str], now: datetime) -> dict[str, set[int]]:
    c = Customer.__table__
    ctx = SqlContext(customer=c, membership=RowMembership(c), local_today=now.date(),
                     instants=TickInstants(now))
    with db.connect() as conn:
        return {text: set(conn.execute(select(c.c.id).where(
            compile_condition(text).sql(ctx))).scalars()) for text in conditions}


def _counted(visits: list[list[datetime]], days: int, now: datetime) -> list[int]:
    since = now - timedelta(days=days)
    return [sum(1 for t in times if since < t <= now) for times in visits]


def _expected(conditions: list[str], visits: list[list[datetime]],
              now: datetime) -> dict[str, set[int]]:
    out = {}
    for text in conditions:
        name, op, value = text.split()
        counts = _counted(visits, int(name.removeprefix("visits_").removesuffix("d")), now)
        out[text] = {i for i, n in enumerate(counts, start=1)
                     if eval(f"{n} {op} {value}")}  # noqa: S307 - the test's own numbers
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(visits=st.lists(st.lists(st.integers(-40 * 86400, 2 * 86400), max_size=22),
                       min_size=1, max_size=5),
       kept=st.lists(st.booleans(), min_size=5, max_size=5),
       conditions=st.lists(st.builds(
           lambda days, op, value: f"visits_{days}d {op} {value}",
           st.sampled_from([1, 7, 30]), st.sampled_from(OPS),
           st.integers(-1, RECENT_VISITS + 3) | st.sampled_from([2.5, 15.5]),
       ), min_size=1, max_size=6),
       minutes=st.integers(-2 * 24 * 60, 2 * 24 * 60),
       fractions=st.tuples(st.sampled_from([0, 1, 500_000]), st.sampled_from([0, 500_000])))
def test_counts_from_the_latest_visits_agree_with_the_events(
        db: Engine, visits: list[list[int]], kept: list[bool], conditions: list[str],
        minutes: int, fractions: tuple[int, int]) -> None:
    """Random visits, some after the instant (a tick in the past), more than a customer keeps,
    some in the same second as the window's start (the list keeps whole seconds); some customers
    without the list: every comparison gives the count's answer."""
    visit_fraction, now_fraction = fractions
    times = [[NOW + timedelta(seconds=s, microseconds=visit_fraction) for s in seconds]
             for seconds in visits]
    c = Customer.__table__
    with db.begin() as conn:
        conn.execute(delete(Event))
        conn.execute(delete(Customer))
        for i, moments in enumerate(times, start=1):
            conn.execute(insert(Customer).values(
                id=i, external_id=f"c{i}", created_at=NOW, updated_at=NOW,
                last_visit_at=max(moments, default=None), visit_count=len(moments)))
            for at in moments:
                conn.execute(insert(Event).values(customer_id=i, kind="visit", occurred_at=at,
                                                  received_at=NOW, properties={}))
        conn.execute(update(c).where(c.c.id.in_(
            [i for i in range(1, len(times) + 1) if kept[i - 1]])).values(
            recent_visits=recent_visits(conn.dialect.name, c.c.id)))
    now = NOW + timedelta(minutes=minutes, microseconds=now_fraction)
    assert _evaluate(db, conditions, now) == _expected(conditions, times, now)


def test_the_list_answers_without_the_events(db: Engine) -> None:
    """Once kept, the customer's counts come from the list: with the events gone they stay
    (proof that the tick does not count them); after the list's own instant, or beyond the
    visits it keeps, the events are counted again."""
    clock = FixedClock(NOW)
    ingest = Ingestor(db, clock)
    ingest.customers([CustomerIn(external_id="c1")])
    visits = [NOW - timedelta(days=d, hours=h) for d in range(10) for h in (1, 5)]  # 20
    ingest.events([EventIn(customer_external_id="c1", kind="visit", occurred_at=t)
                   for t in visits])
    conditions = ["visits_7d >= 14", "visits_7d > 14", "visits_30d >= 16", "visits_30d >= 17",
                  "visits_3d == 6", "visits_1d < 2"]
    expected = _expected(conditions, [visits], NOW)
    assert _evaluate(db, conditions, NOW) == expected
    assert expected == {"visits_7d >= 14": {1}, "visits_7d > 14": set(),
                        "visits_30d >= 16": {1}, "visits_30d >= 17": {1},
                        "visits_3d == 6": {1}, "visits_1d < 2": set()}
    with db.begin() as conn:
        conn.execute(delete(Event))
    answered = _evaluate(db, conditions, NOW)
    # from the list: the same answers; beyond its 16 visits the (now empty) events are counted
    assert answered == {**expected, "visits_30d >= 17": set()}
    # an instant before the latest visit: counted, and there are no events left
    assert _evaluate(db, ["visits_30d >= 1"], NOW - timedelta(hours=2)) == {
        "visits_30d >= 1": set()}


def test_ingestion_keeps_the_latest_visits_newest_first(db: Engine) -> None:
    clock = FixedClock(NOW)
    ingest = Ingestor(db, clock)
    ingest.customers([CustomerIn(external_id="c1"), CustomerIn(external_id="c2")])
    c = Customer.__table__

    def kept() -> dict[str, Any]:
        with db.connect() as conn:
            return dict(conn.execute(select(c.c.external_id, c.c.recent_visits)).all())

    assert kept() == {"c1": [], "c2": []}
    # out of order, over several batches, and other kinds of events beside them
    moments = [NOW - timedelta(hours=h) for h in (7, 3, 30, 1, 12, 2, 50, 9, 4, 8, 6, 11,
                                                  10, 5, 13, 14, 15, 16)]
    for batch in (moments[:5], moments[5:11], moments[11:]):
        ingest.events([EventIn(customer_external_id="c1", kind="visit", occurred_at=t)
                       for t in batch]
                      + [EventIn(customer_external_id="c1", kind="booking", occurred_at=NOW)])
    latest = sorted(moments, reverse=True)[:RECENT_VISITS]
    stored = kept()
    assert stored["c2"] == []
    assert stored["c1"] == [_seconds(t) for t in latest]
    # a visit older than every kept one changes nothing; a newer one enters first
    ingest.events([EventIn(customer_external_id="c1", kind="visit",
                           occurred_at=NOW - timedelta(days=90))])
    assert kept()["c1"] == stored["c1"]
    ingest.events([EventIn(customer_external_id="c1", kind="visit", occurred_at=NOW)])
    assert kept()["c1"] == [_seconds(t) for t in [NOW, *latest[:-1]]]


def _seconds(moment: datetime) -> int:
    return int((moment - EPOCH).total_seconds() // 1)


def test_a_visit_in_the_windows_first_second(db: Engine) -> None:
    """The list keeps whole seconds: a k-th visit in the same second as the window's start is
    inside or outside by its fraction, as the count has it."""
    now = NOW + timedelta(microseconds=500_000)
    start = now - timedelta(days=1)
    ingest = Ingestor(db, FixedClock(NOW))
    ingest.customers([CustomerIn(external_id="before"), CustomerIn(external_id="after"),
                      CustomerIn(external_id="at")])
    ingest.events([
        EventIn(customer_external_id="before", kind="visit",
                occurred_at=start - timedelta(microseconds=300_000)),
        EventIn(customer_external_id="after", kind="visit",
                occurred_at=start + timedelta(microseconds=200_000)),
        EventIn(customer_external_id="at", kind="visit", occurred_at=start)])
    c = Customer.__table__
    with db.connect() as conn:
        ids = dict(conn.execute(select(c.c.external_id, c.c.id)).all())
        assert all(conn.execute(select(c.c.recent_visits)).scalars())  # all three kept
    assert _evaluate(db, ["visits_1d >= 1", "visits_1d == 0"], now) == {
        "visits_1d >= 1": {ids["after"]}, "visits_1d == 0": {ids["before"], ids["at"]}}
