"""The writes' floor: the rows a tick wrote, written again in bare SQL with the plain driver.

The floor (`floor.py`) times the tick's selections without writing anything; this times the
writing without selecting anything. For one committed tick: its stage changes, its occurrences and
their messages are copied to temporary tables, deleted, and its customers' stages set back to
the ones it found (committed; PostgreSQL then vacuums the four tables, so that no dead version
of a row is met again in an index). Then, timed, each table written in one statement from the
copies, the customers' stages as the tick's own UPDATE writes them: the same rows, into the
same tables with the same indexes, in one transaction, rolled back.

It takes the tick's rows out of the database: `tick.py` runs it last, on its own copy of the
base. On a database of your own:

    python bench/writes.py --url sqlite:///bench/out/run-n1000000.db --tick 1
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["measure"]

# In the order the tick writes them; each reads the copies, nothing else.
REDO = (
    ("stage_history", "INSERT INTO stage_history SELECT * FROM wf_stage_history"),
    ("customers", "UPDATE customers SET stage = s.stage, stage_membership_id = s.membership_id,"
                  " stage_since = s.entered_at FROM wf_stage_history s"
                  " WHERE customers.id = s.customer_id"),
    ("occurrences", "INSERT INTO occurrences SELECT * FROM wf_occurrences"),
    ("outbox", "INSERT INTO outbox SELECT * FROM wf_outbox"),
)


def _undo(cur: Any, dialect: str, tick_id: int) -> dict[str, int]:
    """Copy tick `tick_id`'s rows aside and take them out; their counts."""
    temp = "TEMPORARY" if dialect == "postgresql" else "TEMP"
    for sql in (
        "DROP TABLE IF EXISTS wf_stage_history",
        "DROP TABLE IF EXISTS wf_occurrences",
        "DROP TABLE IF EXISTS wf_outbox",
        f"CREATE {temp} TABLE wf_stage_history AS SELECT * FROM stage_history"
        f" WHERE tick_id = {tick_id}",
        f"CREATE {temp} TABLE wf_occurrences AS SELECT * FROM occurrences"
        f" WHERE tick_id = {tick_id}",
        f"CREATE {temp} TABLE wf_outbox AS SELECT * FROM outbox"
        " WHERE occurrence_id IN (SELECT id FROM wf_occurrences)",
        "DELETE FROM outbox WHERE id IN (SELECT id FROM wf_outbox)",
        "DELETE FROM occurrences WHERE id IN (SELECT id FROM wf_occurrences)",
        "DELETE FROM stage_history WHERE id IN (SELECT id FROM wf_stage_history)",
        "UPDATE customers SET stage = s.previous_stage FROM wf_stage_history s"
        " WHERE customers.id = s.customer_id",
    ):
        cur.execute(sql)
    counts = {}
    for name in ("stage_history", "occurrences", "outbox"):
        cur.execute(f"SELECT count(*) FROM wf_{name}")
        counts[name] = int(cur.fetchone()[0])
    counts["customers"] = counts["stage_history"]
    return counts


def measure(conn: Any, dialect: str, tick_id: int) -> dict[str, Any]:
    """The bare writes of tick `tick_id` on a DB-API connection (sqlite3 or psycopg): seconds
    and rows per table, and their sum."""
    if dialect == "sqlite":
        conn.isolation_level = None  # the transactions below are begun and ended by hand
    cur = conn.cursor()
    if dialect == "sqlite":
        # the engine's own page cache and durability (`engine.db.make_engine`)
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("BEGIN IMMEDIATE")
    rows = _undo(cur, dialect, tick_id)
    if dialect == "postgresql":
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM (ANALYZE) customers, stage_history, occurrences, outbox")
        for name in ("stage_history", "occurrences", "outbox"):
            cur.execute(f"ANALYZE wf_{name}")
        conn.autocommit = False
    else:
        cur.execute("COMMIT")
        # the deletions' pages copied into the database file, as a checkpoint after a tick does
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cur.execute("BEGIN IMMEDIATE")
    seconds = {}
    for name, sql in REDO:
        started = time.perf_counter()
        cur.execute(sql)
        seconds[name] = round(time.perf_counter() - started, 4)
        if cur.rowcount != rows[name]:
            raise SystemExit(f"tick {tick_id}: wrote {cur.rowcount} rows of {name},"
                             f" expected {rows[name]}")
    if dialect == "postgresql":
        conn.rollback()
    else:
        cur.execute("ROLLBACK")
    cur.close()
    return {"tick_id": tick_id, "seconds": seconds, "rows": rows,
            "total": sum(seconds.values())}


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tick import _plain_connection

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tick", type=int, required=True, help="the id of a committed tick")
    args = parser.parse_args()
    conn, dialect = _plain_connection(args.url)
    result = measure(conn, dialect, args.tick)
    conn.close()
    for name, took in result["seconds"].items():
        print(f"  {name:<14} {took * 1000:9.1f} ms  {result['rows'][name]:>9,} rows")
    print(f"tick {args.tick}: {result['total']:.3f} s")


if __name__ == "__main__":
    main()
