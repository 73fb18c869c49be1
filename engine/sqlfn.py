"""SQL constructs the evaluator and the contact policy write to steer a statement's plan."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, ColumnElement, DateTime, Integer, Numeric, Select, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = ["among", "unindexed", "unindexed_anywhere"]


class unindexed(FunctionElement[Any]):  # noqa: N801 - reads as a SQL function
    """A column's value, written so that SQLite's planner does not read the term through an
    index: a unary + (its documented way). Other databases get the bare column: PostgreSQL
    weighs the indexes by their statistics."""

    inherit_cache = True

    def __init__(self, column: ColumnElement[Any]) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(unindexed, "sqlite")
def _unindexed_sqlite(element: unindexed, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    return f"(+{compiler.process(column, **kw)})"


@compiles(unindexed)
def _unindexed_default(element: unindexed, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    return str(compiler.process(column, **kw))


class unindexed_anywhere(unindexed):  # noqa: N801 - reads as a SQL function
    """A column's value that no database's planner reads through an index: on PostgreSQL the
    column with a no-op applied (`+ INTERVAL '0 seconds'`, `+ 0`, `|| ''`), which matches no
    index. For a term whose statistics mislead PostgreSQL: a window over the newest rows, past
    the histogram's last value, estimated at a row where there are a hundred thousand."""

    inherit_cache = True


@compiles(unindexed_anywhere, "postgresql")
def _unindexed_anywhere_postgresql(element: unindexed_anywhere, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    sql = compiler.process(column, **kw)
    if isinstance(column.type, DateTime):
        return f"({sql} + INTERVAL '0 seconds')"
    if isinstance(column.type, Integer | Numeric):
        return f"({sql} + 0)"
    if isinstance(column.type, String):
        return f"({sql} || '')"
    raise TypeError(f"unindexed_anywhere: no no-op for a column of type {column.type!r}")


class among(ColumnElement[bool]):  # noqa: N801 - reads as a SQL operator
    """`column IN (values)`, where `values` is a subquery of a few keys that should drive the
    read: PostgreSQL gets `column = ANY(ARRAY(values))`, which it runs once, before the
    statement, and then reads `column`'s index for each key. As a semi-join its planner is free
    to start from the other side, which its estimates may make look cheaper."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition as it stands: no `= 1` where booleans are integers
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("values", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any], values: Select[Any]) -> None:
        self.column = column
        self.values = values.scalar_subquery()


@compiles(among)
def _among_default(element: among, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} IN {compiler.process(element.values, **kw)}"


@compiles(among, "postgresql")
def _among_postgresql(element: among, compiler: Any, **kw: Any) -> str:
    return (f"{compiler.process(element.column, **kw)} = "
            f"ANY(ARRAY{compiler.process(element.values, **kw)})")
