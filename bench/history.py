"""Give a benchmark base a year of marketing history: what the contact policy reads in a club
that has run for a while.

    python bench/history.py --url sqlite:///path/to/copy.db --months 12

For every customer the outbox holds a marketing message for (run a committed first tick first:
`statements.py --at first --commit`), adds `--months` earlier messages of the same trigger and
channel, one a month (30 days) apart before the first, each with its occurrence under the
membership of the customer that had started by then (the earliest, before the first). The
messages are `sent`, so the policy counts them. Commits; run it on a copy, not on the cached
base. Then time the steady tick, with `statements.py --at steady --warm`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rig  # noqa: E402
from sqlalchemy import Connection, text  # noqa: E402

from engine.db import make_engine  # noqa: E402


def _months_ago(dialect: str, column: str) -> str:
    """`column` moved back by `:days` days, in the form the dialect stores instants in."""
    if dialect == "postgresql":
        return f"{column} - make_interval(days => :days)"
    # SQLAlchemy's storage format on SQLite, which comparisons between instants rely on
    return f"strftime('%Y-%m-%d %H:%M:%S', {column}, '-' || :days || ' days') || '.000000'"


def add_history(conn: Connection, months: int, marketing: list[str]) -> int:
    """Add the messages (see the module's docstring); how many were added."""
    dialect = conn.dialect.name
    fired = _months_ago(dialect, "m.created_at")
    day = f"CAST({fired} AS date)" if dialect == "postgresql" else f"substr({fired}, 1, 10)"
    started = (f"(SELECT ms.id FROM memberships ms WHERE ms.customer_id = m.customer_id "
               f"AND ms.starts_on <= {day} ORDER BY ms.starts_on DESC, ms.id DESC LIMIT 1)")
    earliest = ("(SELECT ms.id FROM memberships ms WHERE ms.customer_id = m.customer_id "
                "ORDER BY ms.starts_on, ms.id LIMIT 1)")
    names = ", ".join(f"'{t}'" for t in marketing)
    firsts = (f"SELECT min(id) FROM outbox WHERE trigger_id IN ({names}) "
              "GROUP BY customer_id")
    added = 0
    for month in range(1, months + 1):
        params = {"days": 30 * month, "scope": f"history-{month}"}
        added += conn.execute(text(
            "INSERT INTO occurrences (trigger_id, customer_id, membership_id, scope_key, "
            "tick_id, fired_at, arm, channel, status) "
            f"SELECT m.trigger_id, m.customer_id, coalesce({started}, {earliest}), :scope, 0, "
            f"{fired}, 'treatment', m.channel, 'message' FROM outbox m WHERE m.id IN ({firsts})"),
            params).rowcount
        conn.execute(text(
            "INSERT INTO outbox (occurrence_id, customer_id, trigger_id, channel, template, "
            "recipient, status, due_at, created_at, attempts, sent_at, membership_id) "
            "SELECT o.id, o.customer_id, o.trigger_id, o.channel, m.template, m.recipient, "
            "'sent', o.fired_at, o.fired_at, 1, o.fired_at, o.membership_id "
            "FROM occurrences o JOIN outbox m ON m.customer_id = o.customer_id "
            f"AND m.id IN ({firsts}) WHERE o.scope_key = :scope AND o.tick_id = 0"), params)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--months", type=int, default=12)
    args = parser.parse_args()
    engine = make_engine(args.url)
    marketing = sorted(t.trigger.id for t in rig.load_triggers()
                       if t.trigger.purpose == "marketing")
    started = time.perf_counter()
    with engine.begin() as conn:
        added = add_history(conn, args.months, marketing)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE occurrences, outbox")
    print(f"{added:,} earlier messages in {time.perf_counter() - started:.1f} s")
    engine.dispose()


if __name__ == "__main__":
    main()
