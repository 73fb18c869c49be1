"""Statistics: what each trigger did to its goal, against its randomized holdout.

The unit of analysis is one **exposure unit**: one trigger, one customer, one cycle (membership),
because holdout arm and variant are assigned per (customer, trigger, cycle) and a trigger that
fires several times in a cycle (`once: {every: 30d}`) must not count the same person twice. A unit
**converts** when its goal event (the `conversions` table, filled from the events whose kind is a
goal) happens after its first firing and within the goal window after its last one. Only decided
units are scored: the window has closed by `as_of`, or the unit fired during a membership cycle
that has ended by then (its renewal is settled; a later come-back still counts if it happened
by `as_of`). Both criteria are fixed before the arm is drawn, so they never favour an arm.

The comparison is intention-to-treat: every treatment-arm unit against every holdout unit,
whether or not its message went out (the arm is assigned before the contact policy decides), so
both arms are counted the same way. Lift is the treatment minus the holdout conversion rate, with
a 95% interval (Newcomb) and a two-sided score test p-value from statsmodels. When some treated
units were never sent (no consent, caps, budget), the effect on those actually sent is the lift
divided by the share sent (the Bloom / instrumental-variable estimator, the share taken as known);
it is what a planted per-recipient effect should be compared with.

Attribution views (not causal, for reporting): **any-touch** credits a conversion to every
trigger with a sent message whose window covers it; **last-touch** only to the last such message.
Windows can be re-scored from the stored log with `window_days`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    FunctionElement,
    Integer,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles

from engine.models import (
    Conversion,
    Customer,
    Event,
    Membership,
    Message,
    MessageStatus,
    Occurrence,
    OccurrenceStatus,
    Outcome,
    RuleFileVersion,
    Tick,
    table,
)

__all__ = ["BREAKDOWNS", "Goal", "StatRow", "Stats", "compare", "compute_stats", "goals_of",
           "record_conversions", "render_csv", "render_json"]

BREAKDOWNS = ("stage", "channel", "segment", "version")
SENT = (str(MessageStatus.SENT), str(MessageStatus.DELIVERED))
ALPHA = 0.05
DAY = 86_400
SETTLE = 2 * DAY  # a cycle's renewal is known two days after its last day


@dataclass(frozen=True)
class Goal:
    """A trigger's goal: the event that counts, and for how long after the message."""

    event: str
    within: timedelta


def goals_of(triggers: Iterable[Any]) -> dict[str, Goal]:
    """{trigger id: Goal} of loaded triggers (objects with `.trigger`) or rule-file Triggers."""
    out: dict[str, Goal] = {}
    for item in triggers:
        trig = getattr(item, "trigger", item)
        if trig.goal is not None:
            out[trig.id] = Goal(trig.goal.event, trig.goal.within)
    return out


class Attribution(StrEnum):
    ANY_TOUCH = "any_touch"
    LAST_TOUCH = "last_touch"


# --- dialect-portable epoch seconds -------------------------------------------------------------


class epoch_seconds(FunctionElement[int]):  # noqa: N801 - reads as a SQL function
    """Seconds since 1970 of a naive-UTC timestamp."""

    type = BigInteger()
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    (arg,) = list(element.clauses)
    return f"CAST(strftime('%s', {compiler.process(arg, **kw)}) AS INTEGER)"


@compiles(epoch_seconds)
def _epoch_default(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    (arg,) = list(element.clauses)
    inner = compiler.process(arg, **kw)
    return f"CAST(extract(epoch from date_trunc('second', {inner})) AS BIGINT)"


# --- the numbers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    lift: float
    ci_low: float
    ci_high: float
    p_value: float | None


def compare(conv_t: int, n_t: int, conv_h: int, n_h: int, alpha: float = ALPHA
            ) -> Comparison | None:
    """Treatment minus holdout conversion rate, its (1 - alpha) interval and two-sided p-value."""
    from statsmodels.stats.proportion import (
        confint_proportions_2indep,
        test_proportions_2indep,
    )

    if n_t <= 0 or n_h <= 0:
        return None
    with warnings.catch_warnings():
        # all-or-nothing arms divide by zero inside statsmodels: the p-value is then undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = confint_proportions_2indep(conv_t, n_t, conv_h, n_h, method="newcomb",
                                               compare="diff", alpha=alpha)
        test = test_proportions_2indep(conv_t, n_t, conv_h, n_h, method="score",
                                       compare="diff", return_results=True)
    p = float(test.pvalue)
    return Comparison(conv_t / n_t - conv_h / n_h, float(low), float(high),
                      None if math.isnan(p) else p)


@dataclass
class Counts:
    """Exposure units of one group and arm."""

    units: int = 0
    scored: int = 0  # units whose goal window has closed
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    conversions: int = 0  # among scored units

    def add(self, other: Counts) -> None:
        for name in ("units", "scored", "sent", "delivered", "opened", "clicked", "conversions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class StatRow:
    """One line of the statistics: a trigger (and variant, and breakdown group) vs its holdout."""

    trigger_id: str
    variant: str | None
    breakdown: str | None  # None, "stage", "channel", "segment", "version"
    group: str | None
    n_treatment: int
    n_holdout: int
    sent: int
    delivered: int
    opened: int
    clicked: int
    conversions_treatment: int
    conversions_holdout: int
    rate_treatment: float | None
    rate_holdout: float | None
    lift: float | None
    ci_low: float | None
    ci_high: float | None
    relative_lift: float | None
    p_value: float | None
    share_sent: float | None
    lift_per_sent: float | None
    ci_low_per_sent: float | None
    ci_high_per_sent: float | None
    unscored: int  # units whose window is still open
    any_touch: int | None = None
    last_touch: int | None = None

    @property
    def n(self) -> int:
        return self.n_treatment + self.n_holdout

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n": self.n}


@dataclass
class Stats:
    """Every row: per trigger, per variant, and each breakdown; with what they were scored on."""

    as_of: datetime
    window_days: int | None
    rows: list[StatRow] = field(default_factory=list)

    def triggers(self) -> list[StatRow]:
        """One row per trigger, all variants and groups together."""
        return [r for r in self.rows if r.variant is None and r.breakdown is None]

    def row(self, trigger_id: str, variant: str | None = None, breakdown: str | None = None,
            group: str | None = None) -> StatRow | None:
        for r in self.rows:
            if (r.trigger_id, r.variant, r.breakdown, r.group) == (trigger_id, variant,
                                                                    breakdown, group):
                return r
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"as_of": self.as_of.isoformat(), "window_days": self.window_days,
                "rows": [r.as_dict() for r in self.rows]}


def _row(trigger_id: str, variant: str | None, breakdown: str | None, group: str | None,
         t: Counts, h: Counts) -> StatRow:
    cmp = compare(t.conversions, t.scored, h.conversions, h.scored)
    rate_t = t.conversions / t.scored if t.scored else None
    rate_h = h.conversions / h.scored if h.scored else None
    share = t.sent / t.units if t.units else None

    def per_sent(value: float) -> float | None:
        return value / share if share else None

    return StatRow(
        trigger_id=trigger_id, variant=variant, breakdown=breakdown, group=group,
        n_treatment=t.scored, n_holdout=h.scored, sent=t.sent, delivered=t.delivered,
        opened=t.opened, clicked=t.clicked, conversions_treatment=t.conversions,
        conversions_holdout=h.conversions, rate_treatment=rate_t, rate_holdout=rate_h,
        lift=cmp.lift if cmp else None, ci_low=cmp.ci_low if cmp else None,
        ci_high=cmp.ci_high if cmp else None,
        relative_lift=(cmp.lift / rate_h) if cmp and rate_h else None,
        p_value=cmp.p_value if cmp else None, share_sent=share,
        lift_per_sent=per_sent(cmp.lift) if cmp else None,
        ci_low_per_sent=per_sent(cmp.ci_low) if cmp else None,
        ci_high_per_sent=per_sent(cmp.ci_high) if cmp else None,
        unscored=(t.units - t.scored) + (h.units - h.scored))


# --- SQL -----------------------------------------------------------------------------------------


def record_conversions(conn: Connection, goal_events: Iterable[str]) -> int:
    """Copy goal events not yet recorded into `conversions` (idempotent); how many were new."""
    kinds = sorted(set(goal_events))
    if not kinds:
        return 0
    e, cv = table(Event), table(Conversion)
    new = select(e.c.customer_id, e.c.id, e.c.kind, e.c.occurred_at).where(
        e.c.kind.in_(kinds), ~exists().where(cv.c.event_id == e.c.id))
    return int(conn.execute(cv.insert().from_select(
        ["customer_id", "event_id", "goal_event", "occurred_at"], new)).rowcount)


def _by_trigger(values: Mapping[str, Any], default: Any, type_: Any) -> ColumnElement[Any]:
    o = table(Occurrence)
    if not values:
        return literal(default, type_)
    return case(*((o.c.trigger_id == k, literal(v, type_)) for k, v in values.items()),
                else_=literal(default, type_))


def _units(goals: Mapping[str, Goal], window: timedelta | None, as_of: datetime) -> Any:
    """One row per (trigger, customer, cycle): arm, variant, groups, what was sent, converted."""
    o, m, c, v = table(Occurrence), table(Message), table(Customer), table(RuleFileVersion)
    out, cv, ms = table(Outcome), table(Conversion), table(Membership)
    seen = select(out.c.message_id,
                  func.max(case((out.c.status == "delivered", 1), else_=0)).label("delivered"),
                  func.max(case((out.c.status == "opened", 1), else_=0)).label("opened"),
                  func.max(case((out.c.status == "clicked", 1), else_=0)).label("clicked"),
                  ).group_by(out.c.message_id).subquery("seen")
    seconds = {tid: int((window or g.within).total_seconds()) for tid, g in goals.items()}
    sent = case((m.c.status.in_(SENT), 1), else_=0)
    occ = (
        select(
            o.c.trigger_id, o.c.customer_id,
            o.c.membership_id.label("cycle"),
            func.min(o.c.arm).label("arm"), func.min(o.c.variant).label("variant"),
            func.min(o.c.stage).label("stage"),
            func.min(func.coalesce(m.c.channel, o.c.channel)).label("channel"),
            func.min(o.c.rule_file_version_id).label("version_id"),
            func.min(epoch_seconds(o.c.fired_at)).label("first_at"),
            func.max(epoch_seconds(o.c.fired_at)).label("last_at"),
            (func.max(epoch_seconds(o.c.fired_at)) + _by_trigger(seconds, 0, Integer()))
            .label("closes_at"),
            func.max(sent).label("sent"),
            func.max(case((m.c.status == str(MessageStatus.DELIVERED), 1),
                          else_=func.coalesce(seen.c.delivered, 0))).label("delivered"),
            func.max(func.coalesce(seen.c.opened, 0)).label("opened"),
            func.max(func.coalesce(seen.c.clicked, 0)).label("clicked"),
            _by_trigger({t: g.event for t, g in goals.items()}, "", None).label("goal"),
        )
        .select_from(o.outerjoin(m, m.c.occurrence_id == o.c.id)
                     .outerjoin(seen, seen.c.message_id == m.c.id))
        .where(o.c.status != str(OccurrenceStatus.DRY_RUN), o.c.trigger_id.in_(sorted(goals)))
        .group_by(o.c.trigger_id, o.c.customer_id, o.c.membership_id)
    ).subquery("occ")
    cutoff = _epoch_literal(as_of)
    # Decided: the goal window has closed, or the unit fired during a cycle that has ended (its
    # renewal is settled). Both are fixed before the arm is drawn, so neither biases the arms.
    ends = epoch_seconds(ms.c.ends_on)
    scored = or_(occ.c.closes_at <= cutoff,
                 and_(ends + SETTLE <= cutoff, occ.c.last_at <= ends + DAY))
    converted = exists().where(
        cv.c.customer_id == occ.c.customer_id, cv.c.goal_event == occ.c.goal,
        epoch_seconds(cv.c.occurred_at) > occ.c.first_at,
        epoch_seconds(cv.c.occurred_at) <= occ.c.closes_at)
    version = func.coalesce(v.c.path, "?") + literal("@") + func.coalesce(
        func.substr(v.c.sha256, 1, 8), "?")
    return (
        select(occ.c.trigger_id, occ.c.arm, occ.c.variant, occ.c.stage, occ.c.channel,
               c.c.segment, version.label("version"),
               func.count().label("units"),
               func.sum(case((scored, 1), else_=0)).label("scored"),
               func.sum(occ.c.sent).label("sent"), func.sum(occ.c.delivered).label("delivered"),
               func.sum(occ.c.opened).label("opened"), func.sum(occ.c.clicked).label("clicked"),
               func.sum(case((and_(scored, converted), 1), else_=0)).label("conversions"))
        .select_from(occ.join(c, c.c.id == occ.c.customer_id)
                     .outerjoin(v, v.c.id == occ.c.version_id)
                     .outerjoin(ms, ms.c.id == occ.c.cycle))
        .group_by(occ.c.trigger_id, occ.c.arm, occ.c.variant, occ.c.stage, occ.c.channel,
                  c.c.segment, version)
    )


def _epoch_literal(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1)
    return delta.days * 86400 + delta.seconds


def _touches(conn: Connection, goals: Mapping[str, Goal], window: timedelta | None,
             as_of: datetime) -> dict[str, dict[Attribution, int]]:
    """Conversions credited per trigger: any-touch and last-touch, by sent messages."""
    o, m, cv = table(Occurrence), table(Message), table(Conversion)
    if not goals:
        return {}
    seconds = {tid: int((window or g.within).total_seconds()) for tid, g in goals.items()}
    sent_at = epoch_seconds(func.coalesce(m.c.sent_at, o.c.fired_at))
    conv_at = epoch_seconds(cv.c.occurred_at)
    goal = _by_trigger({t: g.event for t, g in goals.items()}, "", None)
    covering = (
        select(o.c.trigger_id, cv.c.id.label("conversion_id"),
               func.row_number().over(partition_by=cv.c.id,
                                      order_by=(sent_at.desc(), m.c.id.desc())).label("rank"))
        .select_from(o.join(m, m.c.occurrence_id == o.c.id)
                     .join(cv, cv.c.customer_id == o.c.customer_id))
        .where(m.c.status.in_(SENT), o.c.trigger_id.in_(sorted(goals)), cv.c.goal_event == goal,
               conv_at > sent_at, conv_at <= sent_at + _by_trigger(seconds, 0, Integer()),
               conv_at <= _epoch_literal(as_of))
    ).subquery("covering")
    rows = conn.execute(
        select(covering.c.trigger_id, func.count(func.distinct(covering.c.conversion_id)),
               func.count(func.distinct(case((covering.c.rank == 1,
                                              covering.c.conversion_id)))))
        .group_by(covering.c.trigger_id)).all()
    return {tid: {Attribution.ANY_TOUCH: int(anyt), Attribution.LAST_TOUCH: int(last)}
            for tid, anyt, last in rows}


def latest_tick(conn: Connection) -> datetime | None:
    """The instant of the latest real tick: the database's own `now`."""
    found = conn.execute(select(func.max(Tick.now)).where(Tick.dry_run.is_(False))).scalar()
    return found if isinstance(found, datetime) else None


def compute_stats(engine: Engine | Connection, goals: Mapping[str, Goal], *,
                  as_of: datetime | None = None, window_days: int | None = None,
                  breakdowns: Sequence[str] = BREAKDOWNS, variants: bool = True) -> Stats:
    """Score every trigger with a goal against its holdout; `as_of` defaults to the latest tick.

    `window_days` re-scores every goal with that window instead of the rule file's."""
    window = timedelta(days=window_days) if window_days is not None else None
    if isinstance(engine, Connection):
        return _compute(engine, goals, as_of, window, window_days, breakdowns, variants)
    with engine.begin() as conn:
        return _compute(conn, goals, as_of, window, window_days, breakdowns, variants)


def _compute(conn: Connection, goals: Mapping[str, Goal], as_of: datetime | None,
             window: timedelta | None, window_days: int | None, breakdowns: Sequence[str],
             variants: bool) -> Stats:
    record_conversions(conn, (g.event for g in goals.values()))
    as_of = as_of or latest_tick(conn) or datetime.now()
    cube = conn.execute(_units(goals, window, as_of)).mappings().all()
    touches = _touches(conn, goals, window, as_of)
    stats = Stats(as_of=as_of, window_days=window_days)

    def totals(key: Any) -> dict[Any, dict[str, Counts]]:
        out: dict[Any, dict[str, Counts]] = {}
        for r in cube:
            k = key(r)
            if k is None:
                continue
            arms = out.setdefault(k, {"treatment": Counts(), "holdout": Counts()})
            arms.setdefault(r["arm"], Counts()).add(Counts(
                int(r["units"]), int(r["scored"] or 0), int(r["sent"] or 0),
                int(r["delivered"] or 0), int(r["opened"] or 0), int(r["clicked"] or 0),
                int(r["conversions"] or 0)))
        return out

    by_trigger = totals(lambda r: r["trigger_id"])
    # variants are assigned independently of the arm: every holdout unit is their control
    by_variant = totals(lambda r: (r["trigger_id"], r["variant"]) if r["variant"] else None) \
        if variants else {}
    for tid, arms in sorted(by_trigger.items()):
        row = _row(tid, None, None, None, arms["treatment"], arms["holdout"])
        credited = touches.get(tid, {})
        row.any_touch = credited.get(Attribution.ANY_TOUCH, 0)
        row.last_touch = credited.get(Attribution.LAST_TOUCH, 0)
        stats.rows.append(row)
        for (vtid, variant), varms in sorted(by_variant.items()):
            if vtid == tid:
                stats.rows.append(_row(tid, variant, None, None, varms["treatment"],
                                       arms["holdout"]))
    for dim in breakdowns:
        column = dim
        grouped = totals(lambda r, col=column: (r["trigger_id"], str(r[col])))
        for (tid, group), arms in sorted(grouped.items()):
            stats.rows.append(_row(tid, None, dim, group, arms["treatment"], arms["holdout"]))
    return stats


# --- output --------------------------------------------------------------------------------------

COLUMNS = ["trigger_id", "variant", "breakdown", "group", "n", "n_treatment", "n_holdout", "sent",
           "delivered", "opened", "clicked", "conversions_treatment", "conversions_holdout",
           "rate_treatment", "rate_holdout", "lift", "ci_low", "ci_high", "relative_lift",
           "p_value", "share_sent", "lift_per_sent", "ci_low_per_sent", "ci_high_per_sent",
           "unscored", "any_touch", "last_touch"]


def render_csv(stats: Stats) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in stats.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.as_dict().items()})
    return buffer.getvalue()


def render_json(stats: Stats) -> str:
    return json.dumps(stats.as_dict(), indent=2, default=str)


def points(value: float | None, signed: bool = True) -> str:
    """A probability difference in percentage points, e.g. '+4.2'."""
    if value is None:
        return "-"
    return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"



def render_table(stats: Stats, planted: Mapping[tuple[str, str | None], float] | None = None,
                 *, title: str | None = None) -> Any:
    """A rich Table of the per-trigger and per-variant rows (planted effects beside, if given).

    Lift is per message sent (the intention-to-treat lift over the share sent), in points."""
    from rich import box
    from rich.table import Table

    table_ = Table(title=title or f"Per-trigger statistics (scored as of {stats.as_of:%Y-%m-%d})",
                   title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table_.add_column("trigger", no_wrap=True)
    for name in ("n treat/hold", "conv % t/h", "lift pp", "95% CI", "p"):
        table_.add_column(name, justify="right", no_wrap=True)
    if planted is not None:
        table_.add_column("planted", justify="right", no_wrap=True)
    for row in stats.rows:
        if row.breakdown is not None:
            continue
        rates = (f"{points(row.rate_treatment, signed=False)}/"
                 f"{points(row.rate_holdout, signed=False)}")
        cells = [row.trigger_id if row.variant is None else f"  {row.variant}",
                 f"{row.n_treatment}/{row.n_holdout}", rates, points(row.lift_per_sent),
                 _interval(row.ci_low_per_sent, row.ci_high_per_sent),
                 "-" if row.p_value is None else f"{row.p_value:.3f}"]
        if planted is not None:
            value = planted.get((row.trigger_id, row.variant))
            cells.append("-" if value is None else f"{value:+.1f}")
        table_.add_row(*cells)
    return table_


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "-"
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]"
