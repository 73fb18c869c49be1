"""Per-statement timings of one tick, slowest first: where a tick's time goes.

    python bench/statements.py --url sqlite:///bench/out/run-n100000.db --tick full --at first
    python bench/statements.py --url postgresql://postgres@127.0.0.1/tp_bench --tick full --explain

Runs on the database as it is (run `tick.py` or `prepare.py` first for a generated one); the
tick is rolled back unless `--commit`. `--explain` re-runs the slowest statements under
EXPLAIN (ANALYZE) (PostgreSQL) or EXPLAIN QUERY PLAN (SQLite), inside the same transaction.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rig  # noqa: E402
from sqlalchemy import event  # noqa: E402

from engine.clock import FixedClock  # noqa: E402
from engine.db import make_engine  # noqa: E402
from engine.evaluation import Evaluator, TickKind  # noqa: E402

INSTANTS = {"first": rig.FIRST, "steady": rig.STEADY, "incremental": rig.INCREMENTAL}


class StatementTimer:
    """Records every statement an engine executes with its time in the database."""

    def __init__(self, engine: Any) -> None:
        self.timings: list[tuple[float, str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                executemany: bool) -> None:
        conn.info["started"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, params: Any, context: Any,
               executemany: bool) -> None:
        self.timings.append((time.perf_counter() - conn.info.pop("started"), statement, params))

    def summary(self, top: int = 8) -> dict[str, Any]:
        """Time in the database, statement count and the slowest statements; then clears."""
        slowest = sorted(self.timings, key=lambda t: -t[0])[:top]
        out = {"database_seconds": sum(t for t, _, _ in self.timings),
               "statements": len(self.timings),
               "slowest": [{"seconds": round(t, 4), "statement": _label(s, p)}
                           for t, s, p in slowest]}
        self.timings.clear()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tick", choices=["full", "incremental"], default="full")
    parser.add_argument("--at", choices=sorted(INSTANTS), default="first")
    parser.add_argument("--later", type=float, default=0.0, metavar="SECONDS",
                        help="tick this many seconds after the --at instant")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--commit", action="store_true")
    parser.add_argument("--warm", action="store_true",
                        help="run the same tick as a dry run first (compiled statements cached)")
    parser.add_argument("--statement-timeout", type=int, default=600, help="seconds (PostgreSQL)")
    args = parser.parse_args()

    kwargs: dict[str, Any] = {}
    if not args.url.startswith("sqlite"):
        kwargs["connect_args"] = {"options": f"-c statement_timeout={args.statement_timeout}s"}
    engine = make_engine(args.url, **kwargs)
    timings = StatementTimer(engine).timings

    clock = FixedClock(INSTANTS[args.at] + timedelta(seconds=args.later))
    evaluator = Evaluator(engine, rig.load_config(), rig.load_triggers(), clock)
    kind = TickKind(args.tick)
    if args.warm:
        evaluator.tick(kind=kind, dry_run=True)
        timings.clear()
    started = time.perf_counter()
    if args.commit:
        result = evaluator.tick(kind=kind)
    else:
        with engine.connect() as conn:
            trans = conn.begin()
            result = evaluator._tick(conn, kind, False, clock.now())
            if args.explain:
                _explain(conn, sorted(timings, key=lambda t: -t[0])[:args.top])
            trans.rollback()
    total = time.perf_counter() - started
    print(f"{args.tick} tick at {clock.now()}: {total:.3f} s, {len(timings)} statements, "
          f"{sum(t for t, _, _ in timings):.3f} s in the database; "
          f"{result.stage_changes} stage changes, {sum(result.occurrences.values())} occurrences")
    for seconds, statement, params in sorted(timings, key=lambda t: -t[0])[:args.top]:
        print(f"{seconds * 1000:9.1f} ms  {_label(statement, params)}")
    engine.dispose()


def _label(statement: str, params: Any) -> str:
    """The statement's first words, and the trigger an occurrence INSERT is for."""
    text = " ".join(statement.split())
    if text.startswith("INSERT INTO occurrences"):
        trigger = params.get("param_1") if isinstance(params, dict) else params[0]
        return f"INSERT INTO occurrences [{trigger}]"
    return text[:160]


def _explain(conn: Any, slowest: list[tuple[float, str, Any]]) -> None:
    postgres = conn.dialect.name == "postgresql"
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if postgres else "EXPLAIN QUERY PLAN "
    for seconds, statement, params in slowest:
        if not statement.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "WITH")):
            continue
        print(f"\n-- {seconds * 1000:.1f} ms: {_label(statement, params)}")
        savepoint = conn.begin_nested()
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.execute(prefix + statement, params)
        except Exception as exc:  # noqa: BLE001 - e.g. an INSERT whose rows the tick already holds
            print(f"    (not re-run: {str(exc).splitlines()[0]})")
        else:
            for row in cur.fetchall():
                print("   ", row[0] if postgres else row)
        finally:
            cur.close()
        savepoint.rollback()


if __name__ == "__main__":
    main()
