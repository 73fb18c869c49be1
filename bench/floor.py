"""The floor: the same logical selections as a tick, hand-written in SQL and run with the plain
driver (sqlite3 / psycopg), no SQLAlchemy, nothing written.

One statement computes every customer's lifecycle stage and counts those whose stage or cycle
changed (what the tick records); then one statement per trigger counts its candidates: due by its
`when` in the customer's local calendar, in its stages, its conditions holding, not fired within
its `every` window. Counting in the database keeps the cost of moving rows out of the figure, as
the tick's INSERT ... SELECT does. The current membership is read from the customer rows
(`customers.membership_*`, as the tick reads it), not joined.

The stage CASE is written for config/lifecycle.yaml and the conditions for bench/triggers.py;
`check_definitions` refuses to run when either has changed under it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rig import Loaded

from engine.config import ProjectConfig
from engine.evaluation import _latest_slot, local_dates
from engine.rulefile import Anchor, EventWhen, EveryScope, RelativeWhen, ScheduleWhen, StageWhen

__all__ = ["Floor", "check_definitions"]

LIFECYCLE = [
    ("onboarding", ['membership_status == "active"', "0 <= days_since_membership_start < 28",
                    "days_until_membership_end > 30"]),
    ("renewal_due", ['membership_status == "active"', "0 <= days_until_membership_end <= 30"]),
    ("active", ['membership_status == "active"', "days_until_membership_end > 30",
                "not days_since_last_visit > 45"]),
    ("lapsed", []),
]

# Each condition of bench/triggers.py, by hand; {v30_N} is "at least N visits in the last 30
# days" (the N-th latest visit kept on the customer row falls inside the window), {dslv} the
# whole days since the last visit.
CONDITIONS = {
    'plan != "corporate"': "c.membership_plan <> 'corporate'",
    "lifetime_value > 500": "c.lifetime_value > 500",
    "visits_total == 0": "c.visit_count = 0",
    "visits_total == 1": "c.visit_count = 1",
    "visits_total == 10": "c.visit_count = 10",
    "visits_30d < 4": "NOT {v30_4}",
    "visits_30d >= 4": "{v30_4}",
    "visits_30d >= 6": "{v30_6}",
    "visits_30d >= 12": "{v30_12}",
    'segment in ["A", "B"]': "c.segment IN ('A', 'B')",
    'segment in ["A", "B", "C"]': "c.segment IN ('A', 'B', 'C')",
    'segment != "D"': "c.segment <> 'D'",
    "days_since_last_visit > 14": "{dslv} > 14",
    "days_since_last_visit == 10": "{dslv} = 10",
}


def check_definitions(config: ProjectConfig, triggers: list[Loaded]) -> None:
    """The hand-written SQL matches the lifecycle and the triggers it was written for."""
    stages = [(s.id, list(s.conditions)) for s in config.lifecycle.stages]
    if stages != LIFECYCLE:
        raise SystemExit("config/lifecycle.yaml changed: update the stage CASE in bench/floor.py")
    unknown = {c for t in triggers for c in t.trigger.conditions} - set(CONDITIONS)
    if unknown:
        raise SystemExit(f"write these conditions by hand in bench/floor.py: {sorted(unknown)}")


@dataclass
class Dialect:
    """The few spellings that differ between SQLite and PostgreSQL."""

    name: str

    def date(self, value: Any) -> str:
        return f"'{value.isoformat()}'" if self.name == "sqlite" else f"DATE '{value.isoformat()}'"

    def ts(self, value: datetime) -> str:
        text = value.strftime("%Y-%m-%d %H:%M:%S.%f")
        return f"'{text}'" if self.name == "sqlite" else f"TIMESTAMP '{text}'"

    def days(self, a: str, b: str) -> str:
        """Whole days from date a to date b."""
        if self.name == "sqlite":
            return f"CAST(julianday({b}) - julianday({a}) AS INTEGER)"
        return f"({b} - {a})"

    def days_since(self, ts: str, now: datetime) -> str:
        """Whole days (truncated, to the second) from timestamp ts to now."""
        epoch = int((now - datetime(1970, 1, 1)).total_seconds())
        if self.name == "sqlite":
            return f"(({epoch} - CAST(strftime('%s', {ts}) AS INTEGER)) / 86400)"
        return f"(({epoch} - CAST(extract(epoch from date_trunc('second', {ts})) AS BIGINT)) / 86400)"

    def unindexed(self, column: str) -> str:
        """The column, written so that SQLite's planner does not read the term through an index
        (a unary +): without statistics it would otherwise pick any indexed equality."""
        return f"+{column}" if self.name == "sqlite" else column

    def values(self, alias: str, names: list[str], rows: list[tuple[str, ...]]) -> str:
        body = ", ".join(f"({', '.join(r)})" for r in rows)
        if self.name == "sqlite":
            cols = ", ".join(f"column{i + 1} AS {n}" for i, n in enumerate(names))
            return f"(SELECT {cols} FROM (VALUES {body})) {alias}"
        return f"(VALUES {body}) AS {alias}({', '.join(names)})"


class Floor:
    """The hand-written statements for one instant."""

    def __init__(self, dialect: str, config: ProjectConfig, triggers: list[Loaded],
                 now: datetime, zones: set[str], watermarks: dict[str, tuple[int, int]],
                 maxima: tuple[int, int]) -> None:
        check_definitions(config, triggers)
        self.d = Dialect(dialect)
        self.now = now
        self.default = config.club.timezone
        self.days = local_dates({self.default, *zones}, now)
        self.tz = f"coalesce(c.timezone, '{self.default}')"
        self.today = "CASE " + self.tz + " " + " ".join(
            f"WHEN '{d.tz}' THEN {self.d.date(d.today)}" for d in self.days) + " END"
        self.triggers = triggers
        self.watermarks = watermarks
        self.event_max, self.stage_max = maxima

    # pieces -------------------------------------------------------------------------------------

    def v30(self, k: int) -> str:
        """At least k visits in the 30 days: the generated customers keep their latest visits
        (`recent_visits`, whole seconds since 1970, as are the generated visits and the window's
        start) and have none after the benchmark's instants."""
        since = int((self.now - timedelta(days=30) - datetime(1970, 1, 1)).total_seconds())
        if self.d.name == "sqlite":
            return f"coalesce(json_extract(c.recent_visits, '$[{k - 1}]') > {since}, 0)"
        return f"coalesce(CAST((c.recent_visits ->> {k - 1}) AS BIGINT) > {since}, false)"

    def dslv(self) -> str:
        return self.d.days_since("c.last_visit_at", self.now)

    def last_visit_range(self, k: int) -> str:
        """The last visits for which whole days since them can be k (truncated to the second)."""
        high = self.now - timedelta(days=k) if k else self.now + timedelta(days=1)
        return (f"c.last_visit_at BETWEEN {self.d.ts(self.now - timedelta(days=k + 1))}"
                f" AND {self.d.ts(high + timedelta(seconds=1))}")

    def condition(self, text: str) -> str:
        return CONDITIONS[text].format(v30_4=self.v30(4), v30_6=self.v30(6),
                                       v30_12=self.v30(12), dslv=self.dslv())

    def stage_case(self) -> str:
        start = self.d.days("c.membership_starts_on", self.today)
        end = self.d.days(self.today, "c.membership_ends_on")
        return (
            "CASE"
            f" WHEN c.membership_status = 'active' AND {start} >= 0 AND {start} < 28"
            f" AND {end} > 30"
            " THEN 'onboarding'"
            f" WHEN c.membership_status = 'active' AND {end} >= 0 AND {end} <= 30"
            " THEN 'renewal_due'"
            f" WHEN c.membership_status = 'active' AND {end} > 30"
            f" AND ({self.dslv()} IS NULL OR {self.dslv()} <= 45) THEN 'active'"
            " ELSE 'lapsed' END")

    # statements ---------------------------------------------------------------------------------

    def stage_sql(self) -> str:
        return (
            "SELECT count(*) FROM (SELECT c.stage AS old_stage, c.stage_membership_id AS old_m,"
            f" c.current_membership_id AS m_id, {self.stage_case()} AS new_stage"
            " FROM customers c) s"
            " WHERE old_stage IS NULL OR old_stage <> new_stage"
            " OR coalesce(old_m, -1) <> coalesce(m_id, -1)")

    def trigger_sql(self, loaded: Loaded) -> str | None:
        trig = loaded.trigger
        when = trig.when
        event_wm, stage_wm = self.watermarks.get(trig.id, (0, 0))
        source = "customers c"
        where = [self.condition(c) for c in trig.conditions]
        # As a careful hand would write it for a database without planner statistics: a date
        # trigger is read through its anchor date, `days since the last visit == k` through the
        # last visit's range, a schedule trigger otherwise through the stage.
        ranges = [self.last_visit_range(int(match.group(1))) for c in trig.conditions
                  if (match := re.fullmatch(r"days_since_last_visit == (\d+)", c))]
        stage = ("c.stage" if isinstance(when, ScheduleWhen) and not ranges
                 else self.d.unindexed("c.stage"))
        where[:0] = ranges
        if trig.stages:
            where.insert(0, f"{stage} IN (" + ", ".join(f"'{s}'" for s in trig.stages) + ")")
        if isinstance(when, EventWhen):
            if self.event_max <= event_wm:
                return None
            source = (
                "(SELECT e.customer_id, min(e.id) AS event_id FROM events e"
                f" WHERE e.kind = '{when.event}' AND e.id > {event_wm} AND e.id <= {self.event_max}"
                f" AND e.occurred_at > {self.d.ts(self.now - when.within)}"
                f" AND e.occurred_at <= {self.d.ts(self.now)} GROUP BY e.customer_id) ev"
                " JOIN customers c ON c.id = ev.customer_id")
        elif isinstance(when, StageWhen):
            if self.stage_max <= stage_wm:
                return None
            source = (
                "(SELECT sh.customer_id, max(sh.id) AS change_id FROM stage_history sh"
                f" WHERE sh.stage = '{when.stage_entered}' AND sh.id > {stage_wm}"
                f" AND sh.id <= {self.stage_max} GROUP BY sh.customer_id) en"
                " JOIN customers c ON c.id = en.customer_id")
            where.append(f"c.stage = '{when.stage_entered}'")
        elif isinstance(when, RelativeWhen):
            rows = []
            for day in self.days:
                fire = day.today if day.local_now.time() >= when.at else day.today - timedelta(1)
                rows.append((f"'{day.tz}'", self.d.date(fire - timedelta(days=when.offset_days))))
            column = ("c.membership_ends_on" if when.anchor is Anchor.MEMBERSHIP_ENDS
                      else "c.membership_starts_on")
            source += (f" JOIN {self.d.values('due', ['tz', 'anchor'], rows)}"
                       f" ON due.tz = {self.tz} AND due.anchor = {column}")
            where.append(f"{column} IN ({', '.join(sorted({r[1] for r in rows}))})")
        elif isinstance(when, ScheduleWhen):
            rows = [(f"'{day.tz}'", f"'{slot}'") for day in self.days
                    if (slot := _latest_slot(when.schedule, day)) is not None]
            if not rows:
                return None
            source += (f" JOIN {self.d.values('due', ['tz', 'slot'], rows)}"
                       f" ON due.tz = {self.tz}")
        if isinstance(trig.once, EveryScope):
            where.append(
                "NOT EXISTS (SELECT 1 FROM occurrences o WHERE o.trigger_id = "
                f"'{trig.id}' AND o.customer_id = c.id"
                f" AND o.fired_at > {self.d.ts(self.now - trig.once.every)})")
        return f"SELECT count(*) FROM {source}" + (" WHERE " + " AND ".join(where) if where else "")

    def statements(self) -> list[tuple[str, str | None]]:
        return [("stages", self.stage_sql()),
                *((t.trigger.id, self.trigger_sql(t)) for t in self.triggers)]


def run(conn: Any, statements: list[tuple[str, str | None]]) -> dict[str, Any]:
    """Execute each statement once on a DB-API connection; seconds and counts per statement."""
    out: dict[str, Any] = {"seconds": {}, "counts": {}}
    total = 0.0
    cur = conn.cursor()
    for name, sql in statements:
        if sql is None:
            out["seconds"][name], out["counts"][name] = 0.0, 0
            continue
        started = time.perf_counter()
        cur.execute(sql)
        (count,) = cur.fetchone()
        took = time.perf_counter() - started
        total += took
        out["seconds"][name], out["counts"][name] = round(took, 4), count
    cur.close()
    out["total"] = total
    return out

