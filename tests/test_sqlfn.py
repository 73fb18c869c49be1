"""The constructs that steer a statement's plan change what the planner may read through an
index, never the rows a statement selects."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, insert, select

from engine.models import Customer
from engine.sqlfn import unindexed, unindexed_anywhere

NOW = datetime(2026, 3, 2, 9, 0)


def test_an_unindexed_column_selects_the_rows_the_bare_column_does(db: Engine) -> None:
    c = Customer.__table__
    with db.begin() as conn:
        conn.execute(insert(c), [
            {"id": i, "external_id": f"c{i}", "created_at": NOW, "updated_at": NOW,
             "attributes": {}, "stage": stage, "last_visit_at": NOW - timedelta(hours=i)}
            for i, stage in enumerate(["active", "lapsed", "active", None], start=1)])
        for wrap in (unindexed, unindexed_anywhere):
            for column, term in ((c.c.id, lambda col: col > 2),
                                 (c.c.stage, lambda col: col == "active"),
                                 (c.c.last_visit_at, lambda col: col > NOW - timedelta(hours=2))):
                bare = conn.execute(select(c.c.id).where(term(column)).order_by(c.c.id)).all()
                wrapped = conn.execute(select(c.c.id).where(term(wrap(column)))
                                       .order_by(c.c.id)).all()
                assert wrapped == bare and bare, (wrap, column)


def test_postgresql_cannot_read_an_unindexed_anywhere_term_through_an_index(db: Engine) -> None:
    """Where SQLite gets its unary +, PostgreSQL gets a no-op of the column's type: no index
    matches the term (the bare column's would)."""
    c = Customer.__table__
    with db.connect() as conn:
        sql = {wrap: str(select(c.c.id).where(wrap(c.c.last_visit_at) > NOW, wrap(c.c.id) > 2,
                                              wrap(c.c.stage) == "active")
                         .compile(dialect=conn.dialect))
               for wrap in (unindexed, unindexed_anywhere)}
    if db.dialect.name == "postgresql":
        assert "customers.last_visit_at > " in sql[unindexed]
        assert "(customers.last_visit_at + INTERVAL '0 seconds') > " in sql[unindexed_anywhere]
        assert "(customers.id + 0) > " in sql[unindexed_anywhere]
        assert "(customers.stage || '') = " in sql[unindexed_anywhere]
    else:
        assert sql[unindexed] == sql[unindexed_anywhere]
        assert "(+customers.last_visit_at) > " in sql[unindexed_anywhere]
