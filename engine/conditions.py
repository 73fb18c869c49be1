"""The condition language: small Python-like expressions compiled once at load.

    visits_30d >= 4
    plan != "corporate" and segment in ["A", "B"]
    not has_phone or days_since_last_visit > 14
    attributes.goal == "strength"

A condition compiles to a SQLAlchemy expression (the set-wise path) and to a Python predicate over
one customer's facts (the `explain` path). Both use two-valued logic: a comparison with a missing
value is false, and `not` turns false into true.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, not_, or_

from engine.metrics import (
    Facts,
    Metric,
    MetricType,
    SqlContext,
    UnknownName,
    attribute_metric,
    resolve,
    window_comparison,
)

__all__ = ["Condition", "ConditionError", "compile_condition"]

MAX_LENGTH = 500
MAX_NODES = 200

_CMP = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
}
_ORDERING = {"<", "<=", ">", ">="}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


class ConditionError(ValueError):
    """A condition that does not parse or does not type-check; `offset` is 0-based in the text."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


SqlBuilder = Callable[[SqlContext], ColumnElement[Any]]
PyPredicate = Callable[[Facts], bool]


@dataclass(frozen=True)
class Condition:
    """One compiled condition."""

    text: str
    sql: SqlBuilder
    py: PyPredicate
    metrics: tuple[Metric, ...]

    def values(self, facts: Facts) -> dict[str, Any]:
        """The values this condition looked at, for a trace."""
        return {m.name: m.py(facts) for m in self.metrics}


def compile_condition(text: str) -> Condition:
    """Parse and type-check one condition; raises ConditionError pointing into the text."""
    if not isinstance(text, str):
        raise ConditionError(f"a condition is a string such as 'visits_30d >= 4', got {text!r}")
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"condition longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConditionError(f"cannot parse condition: {exc.msg}", max((exc.offset or 1) - 1, 0)) \
            from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ConditionError("condition too complex")
    lead = len(text) - len(text.lstrip())
    compiler = _Compiler(lead)
    sql, py = compiler.boolean(tree.body)
    return Condition(text, sql, py, tuple(compiler.metrics.values()))


@dataclass(frozen=True)
class _Literal:
    value: Any
    type: MetricType | None  # None for the literal None


class _Compiler:
    def __init__(self, lead: int) -> None:
        self.lead = lead
        self.metrics: dict[str, Metric] = {}

    def error(self, node: ast.AST, message: str) -> ConditionError:
        return ConditionError(message, self.lead + getattr(node, "col_offset", 0))

    # boolean context ---------------------------------------------------------------------------

    def boolean(self, node: ast.expr) -> tuple[SqlBuilder, PyPredicate]:
        if isinstance(node, ast.BoolOp):
            parts = [self.boolean(v) for v in node.values]
            sqls = [p[0] for p in parts]
            pys = [p[1] for p in parts]
            if isinstance(node.op, ast.And):
                return (lambda ctx: and_(*(s(ctx) for s in sqls)),
                        lambda f: all(p(f) for p in pys))
            return (lambda ctx: or_(*(s(ctx) for s in sqls)), lambda f: any(p(f) for p in pys))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner_sql, inner_py = self.boolean(node.operand)
            return (lambda ctx: not_(inner_sql(ctx)), lambda f: not inner_py(f))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name | ast.Attribute):
            metric = self.metric(node, MetricType.BOOL)
            if metric.type is not MetricType.BOOL:
                raise self.error(node, f"{metric.name} is a {metric.type}; compare it with a value")
            return (lambda ctx: func.coalesce(metric.sql(ctx), false()),
                    lambda f: metric.py(f) is True)
        if isinstance(node, ast.Constant) and isinstance(node.value, bool):
            value = node.value
            return (lambda ctx: func.coalesce(value, false()), lambda f: value)
        raise self.error(node, "expected a comparison such as visits_30d >= 4")

    def compare(self, node: ast.Compare) -> tuple[SqlBuilder, PyPredicate]:
        # Chains (0 < x <= 5) become a conjunction of pairs.
        pairs = []
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            pairs.append(self.pair(left, _CMP[type(op)], right))
            left = right
        if len(pairs) == 1:
            return pairs[0]
        sqls = [p[0] for p in pairs]
        pys = [p[1] for p in pairs]
        return (lambda ctx: and_(*(s(ctx) for s in sqls)), lambda f: all(p(f) for p in pys))

    def pair(self, left: ast.expr, op: str, right: ast.expr) -> tuple[SqlBuilder, PyPredicate]:
        if isinstance(left, ast.Constant | ast.UnaryOp) and op in _MIRROR and \
                isinstance(right, ast.Name | ast.Attribute):
            left, op, right = right, _MIRROR[op], left  # `0 < x` reads as `x > 0`
        if isinstance(left, ast.Constant | ast.List | ast.Tuple | ast.UnaryOp):
            raise self.error(left, "put the name on the left, e.g. visits_30d >= 4")
        hint = self.literal_type(right)
        metric = self.metric(left, hint)
        if op in ("is", "is not"):
            if not (isinstance(right, ast.Constant) and right.value is None):
                raise self.error(right, f"'{op}' only compares with None")
            if op == "is":
                return (lambda ctx: metric.sql(ctx).is_(None), lambda f: metric.py(f) is None)
            return (lambda ctx: metric.sql(ctx).is_not(None), lambda f: metric.py(f) is not None)
        if op in ("in", "not in"):
            if not isinstance(right, ast.List | ast.Tuple):
                raise self.error(right, f"'{op}' needs a list such as [\"A\", \"B\"]")
            items = [self.literal(e, metric) for e in right.elts]
            if not items:
                raise self.error(right, "the list is empty")
            values = [i.value for i in items]
            if op == "in":
                return (lambda ctx: func.coalesce(metric.sql(ctx).in_(values), false()),
                        lambda f: (v := metric.py(f)) is not None and v in values)
            return (lambda ctx: func.coalesce(metric.sql(ctx).not_in(values), false()),
                    lambda f: (v := metric.py(f)) is not None and v not in values)
        lit = self.literal(right, metric)
        if lit.type is None:
            raise self.error(right, "compare with None using 'is None' or 'is not None'")
        if op in _ORDERING and metric.type is not MetricType.NUMBER:
            raise self.error(right, f"{metric.name} is {metric.type}; '{op}' needs a number")
        value = lit.value
        sql_op, py_op = _OPERATORS[op]
        py: PyPredicate = lambda f: (v := metric.py(f)) is not None and py_op(v, value)  # noqa: E731
        # a windowed visit count against a number reads the customer's latest visits
        windowed = window_comparison(metric, op, value)
        if windowed is not None:
            return windowed, py
        return (lambda ctx: func.coalesce(sql_op(metric.sql(ctx), value), false()), py)

    # names and literals ------------------------------------------------------------------------

    def literal_type(self, node: ast.expr) -> MetricType | None:
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            node = node.elts[0]
        node = _bool_name(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            node = node.operand
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return MetricType.BOOL
            if isinstance(node.value, int | float):
                return MetricType.NUMBER
            if isinstance(node.value, str):
                return MetricType.TEXT
        return None

    def literal(self, node: ast.expr, metric: Metric) -> _Literal:
        node = _bool_name(node)
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sign, node = -1, node.operand
            if not (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
                    and not isinstance(node.value, bool)):
                raise self.error(node, "only numbers can be negative")
        if not isinstance(node, ast.Constant):
            raise self.error(node, "expected a literal value (number, \"text\", true/false)")
        value = node.value
        if value is None:
            return _Literal(None, None)
        if isinstance(value, bool):
            ltype = MetricType.BOOL
        elif isinstance(value, int | float):
            ltype, value = MetricType.NUMBER, sign * value
        elif isinstance(value, str):
            ltype = MetricType.TEXT
        else:
            raise self.error(node, f"unsupported literal {value!r}")
        if ltype is not metric.type:
            raise self.error(node, f"{metric.name} is {metric.type}, compared with {ltype}")
        return _Literal(value, ltype)

    def metric(self, node: ast.expr, hint: MetricType | None) -> Metric:
        if isinstance(node, ast.Name):
            if node.id in ("true", "false", "True", "False"):
                raise self.error(node, "expected a name on the left of the comparison")
            try:
                metric = resolve(node.id)
            except UnknownName as exc:
                raise self.error(node, str(exc)) from None
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "attributes"):
            metric = attribute_metric(node.attr, hint or MetricType.TEXT)
        else:
            raise self.error(node, "expected a metric name or attributes.<name>")
        self.metrics.setdefault(metric.name, metric)
        return metric


def _bool_name(node: ast.expr) -> ast.expr:
    """`true` / `false` as YAML writes them read as the booleans."""
    if isinstance(node, ast.Name) and node.id in ("true", "false"):
        return ast.copy_location(ast.Constant(node.id == "true"), node)
    return node


def _eq(a: Any, b: Any) -> Any:
    return a == b


def _ne(a: Any, b: Any) -> Any:
    return a != b


def _lt(a: Any, b: Any) -> Any:
    return a < b


def _le(a: Any, b: Any) -> Any:
    return a <= b


def _gt(a: Any, b: Any) -> Any:
    return a > b


def _ge(a: Any, b: Any) -> Any:
    return a >= b


# The same callables serve SQL (operator overloading on columns) and Python.
_OPERATORS: dict[str, tuple[Callable[[Any, Any], Any], Callable[[Any, Any], bool]]] = {
    "==": (_eq, _eq), "!=": (_ne, _ne), "<": (_lt, _lt), "<=": (_le, _le), ">": (_gt, _gt),
    ">=": (_ge, _ge),
}
