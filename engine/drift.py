"""What time alone moves: the customers for whom conditions may read differently at two instants
although nothing was ingested for them in between.

A condition moves with the clock only through its time-dependent names: a day count
(`days_until_membership_end`, `days_since_last_visit`) crosses a constant it is compared with,
or a windowed count (`visits_30d`) gains or loses an event as its window slides. Both are index
range scans: the anchors of the day counts whose crossing fell between the two instants, the
events that entered or left the window. Any other use of a time-dependent name (a day count
compared with something other than constants, `days_in_stage`) cannot be bounded this way:
`Drift.of` then returns None, and the caller reads everyone again.

Restaging (`engine.lifecycle`) reads the day counts of the stage conditions; a full tick reads
both kinds for the conditions of date and schedule triggers (`engine.evaluation`).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select, select

from engine.metrics import Clocked, Metric, RowMembership, UnknownName, resolve
from engine.models import Customer, Event

__all__ = ["DayCount", "Drift"]


@dataclass(frozen=True)
class DayCount:
    """A day count the conditions compare with constants, and the values b for which a step
    of the count between b - 1 and b can flip one of those comparisons."""

    clocked: Clocked
    steps: frozenset[int]


@dataclass(frozen=True)
class Drift:
    """The time-dependent names of some conditions, in the forms that can be bounded."""

    day_counts: tuple[DayCount, ...]
    windows: frozenset[tuple[str, int]]  # (event kind, days) of the windowed counts

    @classmethod
    def of(cls, texts: Iterable[str], *, windows: bool = True,
           unbounded: frozenset[str] = frozenset()) -> Drift | None:
        """The drift of these condition texts, or None if some time-dependent name is used in
        a way this cannot bound, or is one of the `unbounded` names. Windowed counts are
        bounded only if `windows`."""
        found: dict[Clocked, set[int]] = {}
        slid: set[tuple[str, int]] = set()
        for text in texts:
            tree = ast.parse(text.strip(), mode="eval")
            covered: set[int] = set()
            for node in ast.walk(tree):
                if not isinstance(node, ast.Compare):
                    continue
                operands = [node.left, *node.comparators]
                for i, operand in enumerate(operands):
                    metric = _metric(operand)
                    if metric is None or metric.timeless or metric.clocked is None:
                        continue
                    # each neighbour with the operator read from the count's side:
                    # `0 <= count` is `count >= 0`
                    sides = ([(_mirrored(type(node.ops[i - 1])), operands[i - 1])]
                             if i > 0 else [])
                    if i + 1 < len(operands):
                        sides.append((type(node.ops[i]), operands[i + 1]))
                    values = [(op, _numbers(n)) for op, n in sides]
                    if any(v is None for _, v in values):
                        continue
                    found.setdefault(metric.clocked, set()).update(
                        b for op, v in values for k in v or () for b in _steps(op, k))
                    covered.add(id(operand))
            for node in ast.walk(tree):
                metric = _metric(node)
                if metric is None:
                    continue
                if metric.name in unbounded:
                    return None
                if metric.timeless or id(node) in covered:
                    continue
                if windows and metric.window is not None:
                    slid.add(metric.window)
                    continue
                return None
        return cls(tuple(DayCount(clocked, frozenset(steps)) for clocked, steps in found.items()),
                   frozenset(slid))

    def moved(self, then: datetime, now: datetime,
              zones: Iterable[str]) -> list[Select[Any]] | None:
        """Selections of the ids of every customer for whom a day count crossed one of its
        constants, or a windowed count gained or lost an event, between `then` and `now` (in
        either order), the customers' time zones being among `zones`. None if a count cannot be
        bounded (a timestamp count falling with the clock)."""
        c = Customer.__table__
        m = RowMembership(c)  # the current membership's dates, indexed on the customer rows
        early, late = min(then, now), max(then, now)
        # A day count on the local calendar moves only where the local date moved: the zones
        # whose date at `late` is after their date at `early`, between those dates.
        moved = [(d0, d1) for d0, d1 in ((_local_date(tz, early), _local_date(tz, late))
                                         for tz in zones) if d1 > d0]
        first_day = min((d0 for d0, _ in moved), default=None)
        last_day = max((d1 for _, d1 in moved), default=None)
        parts: list[Select[Any]] = []
        second = timedelta(seconds=1)
        for count in self.day_counts:
            ranges: list[tuple[Any, Any]] = []
            sign = count.clocked.sign
            if sign < 0 and not count.clocked.local_date:
                return None
            # An integer count moving monotonically flips a comparison only by stepping from
            # b - 1 to b (rising) or from b to b - 1 (falling) for one of its steps (`_steps`).
            # Each bound below holds every anchor for which such a step falls in (early, late].
            for b in sorted(count.steps):
                if count.clocked.local_date:
                    if first_day is None or last_day is None:
                        continue
                    if sign > 0:  # count = local date - anchor reaches b
                        ranges.append((first_day - timedelta(days=b - 1),
                                       last_day - timedelta(days=b)))
                    else:  # count = anchor - local date falls below b
                        ranges.append((first_day + timedelta(days=b),
                                       last_day + timedelta(days=b - 1)))
                else:
                    # whole 24-hour periods since a timestamp t, truncated toward zero: the
                    # count reaches b >= 1 when the clock passes t + b days, b <= 0 when it
                    # passes t + (b - 1) days; a second of slack for the truncation
                    shift = timedelta(days=b if b >= 1 else b - 1)
                    ranges.append((early - shift - second, late - shift + second))
            column = (c if count.clocked.source == "customer" else m).c[count.clocked.column]
            for low_end, high_end in _merged(ranges):
                parts.append(select(c.c.id).where(column.between(low_end, high_end)))
        e = Event.__table__
        for kind, days in sorted(self.windows):
            # the window (t - N days, t] gains the events of (early, late] and loses those of
            # (early - N days, late - N days]
            span = timedelta(days=days)
            for low_end, high_end in _merged([(early - span, late - span), (early, late)]):
                parts.append(select(e.c.customer_id).where(
                    e.c.kind == kind, e.c.occurred_at > low_end, e.c.occurred_at <= high_end))
        return parts


_MIRRORED: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}


def _mirrored(op: type[ast.cmpop]) -> type[ast.cmpop]:
    """`k <op> count` read as `count <op'> k` (an equality reads the same both ways)."""
    return _MIRRORED.get(op, op)


def _steps(op: type[ast.cmpop], k: float) -> tuple[int, ...]:
    """The b for which an integer count stepping between b - 1 and b can change `count <op> k`:
    `< k` and `>= k` change between ceil(k) - 1 and ceil(k), `> k` and `<= k` between
    floor(k) and floor(k) + 1 (the same step unless k is a whole number); an equality, or
    anything else, at both."""
    if op in (ast.Lt, ast.GtE):
        return (math.ceil(k),)
    if op in (ast.Gt, ast.LtE):
        return (math.floor(k) + 1,)
    return (math.ceil(k), math.floor(k) + 1)


def _local_date(tz: str, moment: datetime) -> date:
    return moment.replace(tzinfo=ZoneInfo("UTC")).astimezone(ZoneInfo(tz)).date()


def _merged(ranges: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _metric(node: ast.AST) -> Metric | None:
    if not isinstance(node, ast.Name):
        return None  # attributes.<key> are customer data: timeless
    try:
        return resolve(node.id)
    except UnknownName:
        return None  # true / false


def _numbers(node: ast.expr) -> list[float] | None:
    """The numeric constants of `node` (a number or a list of numbers); [] for None."""
    items = node.elts if isinstance(node, ast.List | ast.Tuple) else [node]
    out: list[float] = []
    for item in items:
        sign = 1
        if isinstance(item, ast.UnaryOp) and isinstance(item.op, ast.USub):
            sign, item = -1, item.operand
        if isinstance(item, ast.Constant) and item.value is None:
            continue
        if not (isinstance(item, ast.Constant) and isinstance(item.value, int | float)
                and not isinstance(item.value, bool)):
            return None
        out.append(sign * float(item.value))
    return out
