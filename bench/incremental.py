"""Incremental ticks in rounds, as a running scheduler makes them: per-statement times of each.

    python bench/incremental.py --url sqlite:///bench/out/run-n1000000.db --rounds 3
    python bench/incremental.py --url postgresql://postgres@127.0.0.1/tp_bench --top 5 --profile

Runs on the database as it is (after `tick.py`, or a snapshot after its full ticks): an
incremental tick first (it compiles every statement shape; not reported), then for each round
10,000 visits from customers spread over the base, ingested through `engine.ingest` a few
minutes after the previous round's, and the incremental tick after them (committed). Run it in
turns with another version of the code on the same database to compare the two. `--profile`
prints where the last round's Python time went.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rig  # noqa: E402
import tick  # noqa: E402

from engine.clock import FixedClock  # noqa: E402
from engine.evaluation import TickKind  # noqa: E402
from engine.ingest import Ingestor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=3, help="slowest statements shown per round")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    engine, clock, evaluator = tick._evaluator(args.url, rig.WARMUP)
    with engine.connect() as conn:
        top = int(conn.exec_driver_sql("SELECT max(id) FROM customers").scalar_one())
    step = max(top // tick.CHANGED, 1)
    evaluator.tick(kind=TickKind.INCREMENTAL, dry_run=True)
    for n in range(args.rounds):
        at = rig.INGEST_AT + timedelta(minutes=3 * n)
        visits = tick._visits(range(1 + n, top + 1, step), at)[:tick.CHANGED]
        Ingestor(engine, FixedClock(at)).events(visits)
        clock.set(at + timedelta(minutes=1))
        profile = cProfile.Profile() if args.profile and n == args.rounds - 1 else None
        if profile:
            profile.enable()
        result = tick._tick(evaluator, kind=TickKind.INCREMENTAL)
        if profile:
            profile.disable()
        print(f"round {n}: {result['seconds']:.3f} s, {result['database_seconds']:.3f} s in the "
              f"database, {result['statements']} statements, {result['occurrences']} occurrences")
        for slow in result["slowest"][:args.top]:
            print(f"  {slow['seconds'] * 1000:7.1f} ms  {slow['statement'][:100]}")
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    engine.dispose()


if __name__ == "__main__":
    main()
