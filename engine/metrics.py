"""The names a condition can use, each defined twice: as SQL over the whole base, and in Python
over one customer's facts (for `explain`, and as the independent side of the differential test).

Both sides agree on every edge: day counts truncate whole seconds toward zero, a missing value is
None/NULL, and dates are compared in the customer's own local calendar.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FromClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeEngine

from engine.models import MEMBERSHIP_MIRROR, RECENT_VISITS, Event

__all__ = [
    "Clocked",
    "Facts",
    "Metric",
    "MetricType",
    "RowMembership",
    "SqlContext",
    "TickInstants",
    "UnknownName",
    "days_between",
    "resolve",
    "known_names",
]


class MetricType(StrEnum):
    NUMBER = "number"
    TEXT = "text"
    BOOL = "bool"


@dataclass(frozen=True)
class SqlContext:
    """The FROM clause a compiled condition refers to, and the tick's instant (`instants`)."""

    customer: FromClause
    membership: RowMembership
    local_today: ColumnElement[Any]
    instants: TickInstants


_EPOCH = datetime(1970, 1, 1)


class RowMembership:
    """The customer's current membership as columns of their own row (`MEMBERSHIP_MIRROR`,
    kept there by ingestion): in place of a joined membership table, `c` names them as the
    table names its columns (`id`: the current membership's). A statement reading it joins
    nothing: no lookup of a membership row per customer."""

    def __init__(self, customers: FromClause) -> None:
        self.c = _Columns({"id": customers.c.current_membership_id,
                           "customer_id": customers.c.id,
                           **{column: customers.c[name]
                              for name, column in MEMBERSHIP_MIRROR.items()}})


class _Columns:
    """Columns by name, as a table's `c` gives them (`c.plan`, `c["plan"]`)."""

    def __init__(self, columns: dict[str, ColumnElement[Any]]) -> None:
        self._columns = columns

    def __getitem__(self, name: str) -> ColumnElement[Any]:
        return self._columns[name]

    def __getattr__(self, name: str) -> ColumnElement[Any]:
        try:
            return self.__dict__["_columns"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None


class TickInstants:
    """The tick's instant (`now`), and instants at fixed offsets from it, as bind parameters
    whose values are read from `now` when a statement runs.

    A statement written over these is the same from tick to tick (`engine.evaluation` keeps it
    and runs it again with the next tick's `now`). They are not passed with the statement's
    parameters: SQLAlchemy keys its compiled statements by the names passed, and a set of
    names that grew as new instants were handed out made every kept statement compile again."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now
        self._binds: dict[str, BindParameter[Any]] = {}

    def at(self, offset: timedelta = timedelta(0)) -> BindParameter[datetime]:
        """The instant `offset` after the tick's."""
        return self._bind("tick_at", offset, seconds=False)

    def seconds_at(self, offset: timedelta = timedelta(0)) -> BindParameter[int]:
        """The instant `offset` after the tick's, in whole seconds since 1970 (floored)."""
        return self._bind("tick_seconds", offset, seconds=True)

    def _bind(self, prefix: str, offset: timedelta, *, seconds: bool) -> BindParameter[Any]:
        micro = offset // timedelta(microseconds=1)
        name = f"{prefix}_{'m' if micro < 0 else 'p'}{abs(micro)}"
        if name not in self._binds:
            self._binds[name] = bindparam(
                name, type_=BigInteger() if seconds else DateTime(),
                callable_=functools.partial(self._value, offset, seconds))
        return self._binds[name]

    def _value(self, offset: timedelta, seconds: bool) -> datetime | int:
        if self.now is None:
            raise RuntimeError("a statement over the tick's instant ran with no instant set")
        moment = self.now + offset
        return math.floor((moment - _EPOCH).total_seconds()) if seconds else moment


@dataclass
class Facts:
    """Everything known about one customer, loaded row by row (the per-customer view)."""

    customer: dict[str, Any]
    membership: dict[str, Any] | None
    local_today: date
    now: datetime
    events: dict[str, list[datetime]] = field(default_factory=dict)


@dataclass(frozen=True)
class Clocked:
    """How a day-count metric moves with the clock: `sign * (clock - column)` in whole days, on the
    customer's local calendar (`local_date`, a date column) or in 24-hour periods (a timestamp)."""

    source: str  # "customer" or "membership"
    column: str
    sign: int  # +1: days since the column's moment; -1: days until it
    local_date: bool


@dataclass(frozen=True)
class Metric:
    """A name usable in a condition.

    `timeless` metrics change only when the customer's data changes; the others also change as
    time passes: `clocked` says how when it is a plain day count, `window` the event kind and
    days when it counts events in a sliding window."""

    name: str
    type: MetricType
    sql: Callable[[SqlContext], ColumnElement[Any]]
    py: Callable[[Facts], Any]
    description: str = ""
    timeless: bool = True
    clocked: Clocked | None = None
    window: tuple[str, int] | None = None


class UnknownName(LookupError):
    """A condition names something that is not a metric or field."""

    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, known_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        super().__init__(f"unknown name {name!r}{hint}")
        self.name = name


# --- dialect-portable day arithmetic ----------------------------------------------------------


class days_between(FunctionElement[int]):  # noqa: N801 - reads as a SQL function
    """Whole days from date `a` to date `b` (b - a)."""

    type = Integer()
    inherit_cache = True


@compiles(days_between, "sqlite")
def _days_between_sqlite(element: days_between, compiler: Any, **kw: Any) -> str:
    a, b = list(element.clauses)
    return (f"CAST(julianday({compiler.process(b, **kw)}) - julianday({compiler.process(a, **kw)})"
            " AS INTEGER)")


@compiles(days_between)
def _days_between_default(element: days_between, compiler: Any, **kw: Any) -> str:
    a, b = list(element.clauses)
    later, earlier = compiler.process(b, **kw), compiler.process(a, **kw)
    return f"(CAST({later} AS DATE) - CAST({earlier} AS DATE))"


class whole_days_since(FunctionElement[int]):  # noqa: N801
    """Whole days (truncated) between timestamp `a` and timestamp `b`, to the second."""

    type = BigInteger()
    inherit_cache = True


@compiles(whole_days_since, "sqlite")
def _wds_sqlite(element: whole_days_since, compiler: Any, **kw: Any) -> str:
    a, b = list(element.clauses)
    return (f"((CAST(strftime('%s', {compiler.process(b, **kw)}) AS INTEGER)"
            f" - CAST(strftime('%s', {compiler.process(a, **kw)}) AS INTEGER)) / 86400)")


@compiles(whole_days_since)
def _wds_default(element: whole_days_since, compiler: Any, **kw: Any) -> str:
    a, b = list(element.clauses)
    return (f"((CAST(extract(epoch from date_trunc('second', {compiler.process(b, **kw)}))"
            f" AS BIGINT) - CAST(extract(epoch from date_trunc('second', "
            f"{compiler.process(a, **kw)})) AS BIGINT)) / 86400)")


def _py_whole_days(a: datetime | None, b: datetime) -> int | None:
    if a is None:
        return None
    seconds = _naive_seconds(b) - _naive_seconds(a)
    return int(seconds / 86400)  # truncation toward zero, as SQL integer division


def _naive_seconds(moment: datetime) -> int:
    delta = moment - _EPOCH
    return delta.days * 86400 + delta.seconds


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, datetime):
        return value.date()
    return date.fromisoformat(str(value))


# --- the catalog -------------------------------------------------------------------------------


def _customer_column(name: str, mtype: MetricType, description: str) -> Metric:
    return Metric(name, mtype, lambda ctx: ctx.customer.c[name], lambda f: f.customer.get(name),
                  description)


def _membership_column(name: str, column: str, mtype: MetricType, description: str) -> Metric:
    return Metric(
        name, mtype, lambda ctx: ctx.membership.c[column],
        lambda f: None if f.membership is None else f.membership.get(column), description)


def _has(name: str, column: str) -> Metric:
    return Metric(
        name, MetricType.BOOL,
        lambda ctx: case((and_(ctx.customer.c[column].is_not(None),
                               ctx.customer.c[column] != ""), true()), else_=false()),
        lambda f: bool(f.customer.get(column)),
        f"the customer has a {column.replace('_', ' ')}")


def _days_in_stage_py(f: Facts) -> int | None:
    return _py_whole_days(f.customer.get("stage_since"), f.now)


_STATIC: dict[str, Metric] = {
    m.name: m
    for m in [
        _customer_column("segment", MetricType.TEXT, "the customer's segment"),
        _customer_column("locale", MetricType.TEXT, "the customer's locale"),
        _customer_column("timezone", MetricType.TEXT, "the customer's IANA time zone"),
        _customer_column("stage", MetricType.TEXT, "the current lifecycle stage"),
        _customer_column("lifetime_value", MetricType.NUMBER,
                         "sum of purchase and membership value"),
        Metric("visits_total", MetricType.NUMBER, lambda ctx: ctx.customer.c.visit_count,
               lambda f: f.customer.get("visit_count"), "visits ever"),
        _has("has_email", "email"),
        _has("has_phone", "phone"),
        _has("has_chat", "chat_id"),
        _membership_column("plan", "plan", MetricType.TEXT, "plan of the current membership"),
        _membership_column("price", "price", MetricType.NUMBER, "price of the current membership"),
        _membership_column("membership_status", "status", MetricType.TEXT,
                           "status of the current membership"),
        Metric("has_membership", MetricType.BOOL,
               lambda ctx: case((ctx.membership.c.id.is_not(None), true()), else_=false()),
               lambda f: f.membership is not None, "the customer has a membership"),
        Metric("days_since_membership_start", MetricType.NUMBER,
               lambda ctx: days_between(ctx.membership.c.starts_on, ctx.local_today),
               lambda f: None if f.membership is None
               else (f.local_today - _as_date(f.membership["starts_on"])).days,  # type: ignore[operator]
               "local days since the current membership started (0 on its first day)",
               timeless=False, clocked=Clocked("membership", "starts_on", 1, True)),
        Metric("days_until_membership_end", MetricType.NUMBER,
               lambda ctx: days_between(ctx.local_today, ctx.membership.c.ends_on),
               lambda f: None if f.membership is None
               else (_as_date(f.membership["ends_on"]) - f.local_today).days,  # type: ignore[operator]
               "local days until the current membership ends (0 on its last day)",
               timeless=False, clocked=Clocked("membership", "ends_on", -1, True)),
        Metric("days_since_last_visit", MetricType.NUMBER,
               lambda ctx: whole_days_since(ctx.customer.c.last_visit_at, ctx.instants.at()),
               lambda f: _py_whole_days(f.customer.get("last_visit_at"), f.now),
               "whole days since the last visit; missing if the customer never visited",
               timeless=False, clocked=Clocked("customer", "last_visit_at", 1, False)),
        Metric("days_in_stage", MetricType.NUMBER,
               lambda ctx: whole_days_since(ctx.customer.c.stage_since, ctx.instants.at()),
               _days_in_stage_py, "whole days since the customer entered the current stage",
               timeless=False),
    ]
}

# `visits_30d`, `bookings_7d`, `purchases_365d`: events of a kind in the last N days.
_WINDOWED = re.compile(r"^(visits|bookings|purchases)_(\d{1,4})d$")
_EVENT_KINDS = {"visits": "visit", "bookings": "booking", "purchases": "purchase"}
VISIT_KIND = "visit"  # the kind whose latest instants customers keep (`recent_visits`)


def _window_count(ctx: SqlContext, kind: str, days: int) -> ColumnElement[Any]:
    """The customer's events of `kind` in the `days` before the tick's instant: a count through
    the events index."""
    return (
        select(func.count())
        .where(Event.customer_id == ctx.customer.c.id, Event.kind == kind,
               Event.occurred_at > ctx.instants.at(-timedelta(days=days)),
               Event.occurred_at <= ctx.instants.at())
        .correlate(ctx.customer)
        .scalar_subquery()
    )


class nth_recent_visit(FunctionElement[int]):  # noqa: N801 - reads as a SQL function
    """The instant (whole seconds since 1970) of the customer's (index + 1)-th latest visit in
    `recent_visits`, or NULL if they have fewer visits."""

    type = BigInteger()
    inherit_cache = True

    def __init__(self, column: ColumnElement[Any], index: int) -> None:
        # the index as a literal column: part of the statement's cache key
        super().__init__(column, literal_column(str(int(index))))


@compiles(nth_recent_visit, "sqlite")
def _nth_sqlite(element: nth_recent_visit, compiler: Any, **kw: Any) -> str:
    column, index = element.clauses
    return f"json_extract({compiler.process(column, **kw)}, '$[{index.name}]')"


@compiles(nth_recent_visit)
def _nth_default(element: nth_recent_visit, compiler: Any, **kw: Any) -> str:
    column, index = element.clauses
    return f"CAST(({compiler.process(column, **kw)} ->> {index.name}) AS BIGINT)"


def visits_at_least(ctx: SqlContext, days: int, k: int) -> ColumnElement[bool]:
    """`visits_<days>d >= k`, never NULL.

    The customer had at least k visits in the window exactly when their k-th latest visit lies
    inside it, provided none lies after the tick's instant (`last_visit_at`, kept with the
    list, is the latest of all): then the k-th instant of `recent_visits` answers from the
    customer row. Customers without the list (NULL: not computed), with visits after the
    instant (a tick in the past: backtests, a clock behind the data), or a k beyond the list
    are counted through the events."""
    if k <= 0:
        return true()
    count = _window_count(ctx, VISIT_KIND, days)
    if k > RECENT_VISITS:
        return count >= k
    c = ctx.customer.c
    kept = and_(c.recent_visits.is_not(None),
                or_(c.last_visit_at.is_(None), c.last_visit_at <= ctx.instants.at()))
    # the list holds whole seconds: a k-th visit in the window's first second is counted
    since = ctx.instants.seconds_at(-timedelta(days=days))
    kth = nth_recent_visit(c.recent_visits, k - 1)
    return case((and_(kept, kth > since), true()),
                (and_(kept, kth == since), count >= k),
                (kept, false()),
                else_=count >= k)


def window_comparison(metric: Metric, op: str, value: Any,
                      ) -> Callable[[SqlContext], ColumnElement[bool]] | None:
    """`metric <op> value` for a windowed visit count and a number, as `visits_at_least`
    terms (None for anything else: compiled as it reads)."""
    if metric.window is None or metric.window[0] != VISIT_KIND \
            or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    days = metric.window[1]
    # counts are whole: `>= 5.5` is `>= 6`, `> 5.5` and `> 5` are `>= 6`
    at_least = math.ceil(value)
    above = math.floor(value) + 1
    if op == ">=":
        return lambda ctx: visits_at_least(ctx, days, at_least)
    if op == ">":
        return lambda ctx: visits_at_least(ctx, days, above)
    if op == "<":
        return lambda ctx: not_(visits_at_least(ctx, days, at_least))
    if op == "<=":
        return lambda ctx: not_(visits_at_least(ctx, days, above))
    if op in ("==", "!="):
        if value != int(value):
            return lambda ctx: true() if op == "!=" else false()
        k = int(value)

        def exactly(ctx: SqlContext) -> ColumnElement[bool]:
            return and_(visits_at_least(ctx, days, k), not_(visits_at_least(ctx, days, k + 1)))
        return exactly if op == "==" else (lambda ctx: not_(exactly(ctx)))
    return None


def _windowed(name: str, kind: str, days: int) -> Metric:
    def sql(ctx: SqlContext) -> ColumnElement[Any]:
        return _window_count(ctx, kind, days)

    def py(f: Facts) -> int:
        since = f.now - timedelta(days=days)
        return sum(1 for t in f.events.get(kind, ()) if since < t <= f.now)

    return Metric(name, MetricType.NUMBER, sql, py, f"{kind} events in the last {days} days",
                  timeless=False, window=(kind, days))


def resolve(name: str) -> Metric:
    """The metric for a name, or UnknownName with a suggestion."""
    if name in _STATIC:
        return _STATIC[name]
    match = _WINDOWED.match(name)
    if match and 0 < int(match.group(2)) <= 3650:
        return _windowed(name, _EVENT_KINDS[match.group(1)], int(match.group(2)))
    raise UnknownName(name)


class json_attr(FunctionElement[Any]):  # noqa: N801
    """`attributes.<key>` when the stored JSON value has the wanted type, else NULL."""

    inherit_cache = True

    def __init__(self, column: ColumnElement[Any], key: str, mtype: MetricType) -> None:
        self.key, self.mtype = key, mtype
        super().__init__(column)
        types: dict[MetricType, TypeEngine[Any]] = {MetricType.NUMBER: Float(),
                                                     MetricType.BOOL: Boolean()}
        self.type = types.get(mtype, String())


_SQLITE_JSON_TYPES = {MetricType.TEXT: "('text')", MetricType.NUMBER: "('integer', 'real')",
                      MetricType.BOOL: "('true', 'false')"}
_PG_JSON_TYPES = {MetricType.TEXT: "string", MetricType.NUMBER: "number",
                  MetricType.BOOL: "boolean"}


@compiles(json_attr, "sqlite")
def _json_attr_sqlite(element: json_attr, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    col = compiler.process(column, **kw)
    path = compiler.process(literal("$." + json.dumps(element.key)), **kw)
    return (f"CASE WHEN json_type({col}, {path}) IN {_SQLITE_JSON_TYPES[element.mtype]} "
            f"THEN json_extract({col}, {path}) END")


@compiles(json_attr)
def _json_attr_pg(element: json_attr, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    col = f"CAST({compiler.process(column, **kw)} AS JSONB)"
    key = compiler.process(literal(element.key), **kw)
    cast_to = {MetricType.NUMBER: "DOUBLE PRECISION", MetricType.BOOL: "BOOLEAN"}.get(
        element.mtype, "TEXT")
    return (f"CASE WHEN jsonb_typeof({col} -> {key}) = '{_PG_JSON_TYPES[element.mtype]}' "
            f"THEN CAST({col} ->> {key} AS {cast_to}) END")


def attribute_metric(key: str, mtype: MetricType) -> Metric:
    """`attributes.<key>`: a free customer attribute; a value of another type counts as missing."""

    def sql(ctx: SqlContext) -> ColumnElement[Any]:
        return json_attr(ctx.customer.c.attributes, key, mtype)

    def py(f: Facts) -> Any:
        value = (f.customer.get("attributes") or {}).get(key)
        if value is None:
            return None
        if mtype is MetricType.NUMBER:
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
                else None
        if mtype is MetricType.BOOL:
            return value if isinstance(value, bool) else None
        return value if isinstance(value, str) else None

    return Metric(f"attributes.{key}", mtype, sql, py, f"the customer attribute {key!r}")


def known_names() -> Sequence[str]:
    """Names for suggestions and the reference: the static ones and windowed examples."""
    return [*sorted(_STATIC), "visits_7d", "visits_30d", "visits_90d", "bookings_30d",
            "purchases_365d"]
