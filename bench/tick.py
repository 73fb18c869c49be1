"""The tick benchmark: how long a full and an incremental tick take over a generated club, against
the same selections in bare SQL and against evaluating customers one at a time in Python.

    python bench/tick.py                        # 1,000,000 customers; SQLite, and PostgreSQL too
                                                # when TOUCHPOINTS_BENCH_POSTGRES_URL is set
    python bench/tick.py --customers 20000      # quick mode
    python bench/tick.py --backend postgresql --postgres-url postgresql://postgres@127.0.0.1/tp_bench

See bench/README.md for what each figure means. Every measurement runs in a fresh subprocess
(`--phase`), so generation does not count towards the peak memory of the ticks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rig  # noqa: E402
from prepare import OUT, prepare_postgres, prepare_sqlite  # noqa: E402
from statements import StatementTimer  # noqa: E402

ENV_URL = "TOUCHPOINTS_BENCH_POSTGRES_URL"
CHANGED = 10_000  # customers touched before the incremental tick
TARGETS = {  # backend -> full-tick seconds; the others are shared
    "sqlite": 2.5,
    "postgresql": 1.5,
}
FLOOR_RATIO = 3.0
INCREMENTAL_SECONDS = 0.1
PEAK_MB = 200.0
POLICY_RATIO = 1.3  # the steady full tick with the contact policy over without it


# --- phases (each runs in its own subprocess) ---------------------------------------------------


def _peak_mb() -> float:
    """This process's RSS high-water mark. Linux's VmHWM, because ru_maxrss carries the parent's
    peak over into a child started with fork/vfork + exec (the generator's, here)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _evaluator(url: str, now: datetime) -> tuple[Any, Any, Any]:
    from engine.clock import FixedClock
    from engine.db import make_engine
    from engine.evaluation import Evaluator

    engine = make_engine(url)
    clock = FixedClock(now)
    evaluator = Evaluator(engine, rig.load_config(), rig.load_triggers(), clock)
    evaluator.timer = StatementTimer(engine)
    return engine, clock, evaluator


def _tick(evaluator: Any, **kwargs: Any) -> dict[str, Any]:
    evaluator.timer.summary()  # forget what ran before this tick
    started = time.perf_counter()
    result = evaluator.tick(**kwargs)
    seconds = time.perf_counter() - started
    # SQLite: the write-ahead log's checkpoint after the tick, on the checkpointer's thread;
    # waited for here, so that the next measurement does not share the machine with it
    done = evaluator.checkpoints.wait() if evaluator.checkpoints and not result.dry_run else None
    return {"seconds": seconds, "stage_changes": result.stage_changes,
            "checkpoint": None if done is None else {
                "seconds": done.seconds, "frames": done.frames, "complete": done.complete},
            "occurrences": sum(result.occurrences.values()), "messages": result.messages,
            "held_out": result.held_out, "skipped": result.skipped,
            "by_trigger": result.occurrences, "peak_mb": _peak_mb(),
            **evaluator.timer.summary()}


# autovacuum's settings (the server's, defaults unless changed) and the threshold each applies:
# a table is vacuumed when its dead rows, or the rows inserted since its last vacuum, pass
# threshold + scale factor x its rows; analysed when the rows changed since its last analysis do
_VACUUM = "VACUUM (ANALYZE)"
_AUTOVACUUM = (("n_dead_tup", "autovacuum_vacuum_threshold", "autovacuum_vacuum_scale_factor",
                _VACUUM),
               ("n_ins_since_vacuum", "autovacuum_vacuum_insert_threshold",
                "autovacuum_vacuum_insert_scale_factor", _VACUUM),
               ("n_mod_since_analyze", "autovacuum_analyze_threshold",
                "autovacuum_analyze_scale_factor", "ANALYZE"))


def _a_day_of_autovacuum(engine: Any) -> dict[str, Any]:
    """On PostgreSQL, what autovacuum does in the day between the first tick and the steady one,
    done here and not timed: VACUUM or ANALYZE each table past autovacuum's thresholds. A server
    may run with autovacuum off (a CI server does); the steady tick would then find the first
    tick's million dead customer rows still there, which no running club's server leaves a day."""
    if engine.dialect.name != "postgresql":
        return {}
    engine.dispose()  # the tick's connections exit and report their statistics
    started = time.perf_counter()
    done: dict[str, str] = {}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        server = conn.exec_driver_sql("SHOW autovacuum").scalar_one()
        settings = {name: float(conn.exec_driver_sql(f"SHOW {name}").scalar_one())
                    for _, threshold, scale, _ in _AUTOVACUUM for name in (threshold, scale)}
        for _ in range(50):  # statistics reach the cumulative view within a second or so
            rows = conn.exec_driver_sql(
                "SELECT s.relname, greatest(c.reltuples, 0), s.n_dead_tup, s.n_ins_since_vacuum, "
                "s.n_mod_since_analyze FROM pg_stat_user_tables s "
                "JOIN pg_class c ON c.oid = s.relid ORDER BY s.relname").all()
            if any(r[2] or r[3] or r[4] for r in rows):
                break
            time.sleep(0.1)
        for name, tuples, *counts in rows:
            for count, (_, threshold, scale, command) in zip(counts, _AUTOVACUUM, strict=True):
                # a vacuum analyses too: it is not replaced by a bare ANALYZE
                if count > settings[threshold] + settings[scale] * tuples \
                        and done.get(name) != _VACUUM:
                    done[name] = command
        for name, command in done.items():
            conn.exec_driver_sql(f'{command} "{name}"')
    return {"server_autovacuum": server, "seconds": time.perf_counter() - started,
            "tables": done}


def _trigger_states(engine: Any) -> dict[str, list[int]]:
    from sqlalchemy import select

    from engine.models import TriggerState

    with engine.connect() as conn:
        return {r.trigger_id: [r.event_watermark, r.stage_watermark]
                for r in conn.execute(select(TriggerState.__table__))}


def phase_full(url: str) -> dict[str, Any]:
    """The first full tick (assigns every stage), then the same instant on the next day."""
    baseline = _peak_mb()
    engine, clock, evaluator = _evaluator(url, rig.FIRST)
    imported = _peak_mb()
    first = _tick(evaluator)
    watermarks = _trigger_states(engine)
    vacuum = _a_day_of_autovacuum(engine)
    clock.set(rig.STEADY)
    # the steady tick with and without the contact policy, as dry runs (rolled back), twice
    # each and alternating, so that neither gets all the warm caches
    policy, runs = evaluator.policy, {"on": [], "off": []}
    for _ in range(2):
        for mode in ("off", "on"):
            evaluator.policy = policy if mode == "on" else None
            runs[mode].append(_tick(evaluator, dry_run=True)["seconds"])
    evaluator.policy = policy
    steady = _tick(evaluator)
    engine.dispose()
    return {"baseline_mb": baseline, "imported_mb": imported, "first": first, "steady": steady,
            "watermarks": watermarks, "autovacuum": vacuum,
            "policy": {"on_seconds": min(runs["on"]), "off_seconds": min(runs["off"])}}


def phase_floor(url: str, watermarks: dict[str, list[int]], sample: int) -> dict[str, Any]:
    """The bare-SQL floor at the steady tick's instant, then the naive baseline."""
    import floor
    import naive

    from engine.db import make_engine

    config, triggers = rig.load_config(), rig.load_triggers()
    conn, dialect = _plain_connection(url)
    cur = conn.cursor()
    zones = {r[0] for r in _all(cur, "SELECT DISTINCT timezone FROM customers") if r[0]}
    event_max = _all(cur, "SELECT coalesce(max(id), 0) FROM events")[0][0]
    stage_max = _all(cur, "SELECT coalesce(max(id), 0) FROM stage_history")[0][0]
    cur.close()
    conn.rollback()
    statements = floor.Floor(dialect, config, triggers, rig.STEADY, zones,
                             {k: (v[0], v[1]) for k, v in watermarks.items()},
                             (event_max, stage_max)).statements()
    runs = [floor.run(conn, statements) for _ in range(2)]
    conn.rollback()
    conn.close()
    best = min(runs, key=lambda r: r["total"])

    engine = make_engine(url)
    naive_result = naive.run(engine, config, triggers, rig.STEADY, sample)
    engine.dispose()
    return {"floor": best, "naive": naive_result}


def phase_incremental(url: str) -> dict[str, Any]:
    """Incremental ticks as a running scheduler makes them: a first one in this process after
    a few visits (it compiles every statement shape: the cold figure), then CHANGED customers,
    spread over the base, visit (ingested as the API would; timed, not a tick figure), and the
    measured incremental tick sees exactly those changes."""
    from engine.clock import FixedClock
    from engine.evaluation import TickKind
    from engine.ingest import Ingestor

    baseline = _peak_mb()
    engine, clock, evaluator = _evaluator(url, rig.WARMUP)
    with engine.connect() as conn:
        top = int(conn.exec_driver_sql("SELECT max(id) FROM customers").scalar_one())
    step = max(top // CHANGED, 1)
    early = _visits(range(2, top + 1, step * 100), rig.WARMUP)
    Ingestor(engine, FixedClock(rig.WARMUP)).events(early)
    cold = _tick(evaluator, kind=TickKind.INCREMENTAL)

    visits = _visits(range(1, top + 1, step), rig.INGEST_AT)[:CHANGED]
    started = time.perf_counter()
    Ingestor(engine, FixedClock(rig.INGEST_AT)).events(visits)
    ingest_seconds = time.perf_counter() - started
    clock.set(rig.INCREMENTAL)
    result = _tick(evaluator, kind=TickKind.INCREMENTAL)
    engine.dispose()
    return {"baseline_mb": baseline, "incremental": result, "cold": cold,
            "cold_changed": len(early), "ingested": len(visits), "ingest_seconds": ingest_seconds}


def phase_repeated(url: str) -> dict[str, Any]:
    """Full ticks as the scheduler repeats them (every minute by default): the first after the
    incremental tick (the 10,000 changed customers are restaged), then one a minute later, in
    the same process (its statements compiled, the pages it read still cached)."""
    engine, clock, evaluator = _evaluator(url, rig.AFTER)
    after = _tick(evaluator)
    clock.set(rig.REPEATED)
    repeated = _tick(evaluator)
    engine.dispose()
    return {"after": after, "repeated": repeated}


def phase_writes(url: str) -> dict[str, Any]:
    """The writes' floor of the first and the steady tick (`writes.py`). It takes their rows
    out of the database: the last phase."""
    import writes

    conn, dialect = _plain_connection(url)
    cur = conn.cursor()
    first, steady = (row[0] for row in _all(
        cur, "SELECT id FROM ticks WHERE kind = 'full' AND NOT dry_run ORDER BY id LIMIT 2"))
    cur.close()
    out = {"steady": writes.measure(conn, dialect, steady),
           "first": writes.measure(conn, dialect, first)}
    conn.close()
    return out


def _visits(ids: range, at: datetime) -> list[Any]:
    from engine.ingest import EventIn

    return [EventIn(customer_external_id=f"c{cid}", kind="visit", occurred_at=at) for cid in ids]


def _plain_connection(url: str) -> tuple[Any, str]:
    if url.startswith("sqlite"):
        import sqlite3

        return sqlite3.connect(url.split("///", 1)[1]), "sqlite"
    import psycopg
    from sqlalchemy.engine import make_url

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(plain)
    conn.execute("SET jit = off")  # as the engine's own connections
    return conn, "postgresql"


def _all(cur: Any, sql: str) -> list[Any]:
    cur.execute(sql)
    return list(cur.fetchall())


# --- orchestration -------------------------------------------------------------------------------


def _run_phase(name: str, url: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", name, "--url", url,
           "--payload", json.dumps(payload or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {name} failed")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_backend(backend: str, n: int, pg_url: str | None, sample: int) -> dict[str, Any]:
    print(f"[{backend}] preparing {n:,} customers ...", file=sys.stderr, flush=True)
    if backend == "sqlite":
        path, info = prepare_sqlite(n)
        url = f"sqlite:///{path}"
    else:
        assert pg_url
        url, info = prepare_postgres(pg_url, n)
    print(f"[{backend}] {info}", file=sys.stderr, flush=True)
    print(f"[{backend}] full ticks ...", file=sys.stderr, flush=True)
    full = _run_phase("full", url)
    print(f"[{backend}] floor, naive, ingestion ...", file=sys.stderr, flush=True)
    floor = _run_phase("floor", url, {"watermarks": full["watermarks"], "sample": sample})
    print(f"[{backend}] incremental tick ...", file=sys.stderr, flush=True)
    incremental = _run_phase("incremental", url)
    print(f"[{backend}] full ticks a minute apart ...", file=sys.stderr, flush=True)
    repeated = _run_phase("repeated", url)
    print(f"[{backend}] the writes of the first and the steady tick in bare SQL ...",
          file=sys.stderr, flush=True)
    written = _run_phase("writes", url)
    return summarise(backend, n, info, full, floor, incremental, repeated, written)


def summarise(backend: str, n: int, info: dict[str, Any], full: dict[str, Any],
              floor: dict[str, Any], incremental: dict[str, Any],
              repeated: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    first, steady = full["first"], full["steady"]
    inc = incremental["incremental"]
    after, again = repeated["after"], repeated["repeated"]
    floor_total = floor["floor"]["total"]
    naive_seconds = floor["naive"]["extrapolated_seconds"]
    peak = max(first["peak_mb"], steady["peak_mb"], inc["peak_mb"], incremental["cold"]["peak_mb"],
               after["peak_mb"], again["peak_mb"])
    limit = TARGETS[backend]
    policy = full["policy"]
    policy_ratio = policy["on_seconds"] / policy["off_seconds"]
    checks = {
        "first full tick": (first["seconds"], f"<= {limit} s", first["seconds"] <= limit),
        "steady full tick": (steady["seconds"], f"<= {limit} s", steady["seconds"] <= limit),
        "full tick a minute later": (again["seconds"], f"<= {limit} s",
                                     again["seconds"] <= limit),
        "steady tick / floor": (steady["seconds"] / floor_total, f"<= {FLOOR_RATIO}x",
                                steady["seconds"] / floor_total <= FLOOR_RATIO),
        "incremental tick": (inc["seconds"], f"<= {INCREMENTAL_SECONDS} s",
                             inc["seconds"] <= INCREMENTAL_SECONDS),
        "peak RSS (MB)": (peak, f"<= {PEAK_MB:.0f} MB", peak <= PEAK_MB),
        "steady tick, policy on / off": (policy_ratio, f"<= {POLICY_RATIO}x",
                                         policy_ratio <= POLICY_RATIO),
    }
    return {
        "backend": backend, "customers": n, "measured_at": datetime.now().isoformat(
            timespec="seconds"), "machine": _machine(), "data": info,
        "first_full_tick": first, "steady_full_tick": steady, "incremental_tick": inc,
        "full_tick_after_incremental": after, "full_tick_a_minute_later": again,
        "floor": floor["floor"], "naive": floor["naive"], "policy": policy,
        "autovacuum_before_steady_tick": full["autovacuum"],
        "incremental_tick_cold": {**incremental["cold"], "changed": incremental["cold_changed"]},
        "ingest": {"events": incremental["ingested"], "seconds": incremental["ingest_seconds"]},
        "writes": written,
        "ratios": {"first_tick_over_floor": first["seconds"] / floor_total,
                   "steady_tick_over_floor": steady["seconds"] / floor_total,
                   "steady_tick_over_floor_and_writes":
                       steady["seconds"] / (floor_total + written["steady"]["total"]),
                   "naive_over_steady_tick": naive_seconds / steady["seconds"]},
        "memory": {"peak_rss_mb": peak, "interpreter_mb": full["baseline_mb"],
                   "after_imports_mb": full["imported_mb"], "method": "RSS high-water mark (VmHWM) of the tick "
                   "subprocesses"},
        "targets": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in checks.items()},
    }


def _machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says whether the cores were shared."""
    import platform
    import sqlite3

    model = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) // 1024 for line in _lines("/proc/meminfo")
                   if line.startswith("MemTotal:")), None)
    return {"cpus": os.cpu_count(), "cpu": model, "memory_mb": memory,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _tables_done(tables: dict[str, str]) -> str:
    vacuumed = [t for t, command in tables.items() if command == _VACUUM]
    analysed = [t for t, command in tables.items() if command != _VACUUM]
    return "; ".join([*([f"vacuumed {', '.join(vacuumed)}"] if vacuumed else []),
                      *([f"analysed {', '.join(analysed)}"] if analysed else [])]) or "nothing due"


def _checkpointed(tick: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The row of the SQLite log's checkpoint after a tick, if it had one."""
    if not (done := tick.get("checkpoint")):
        return []
    return [("  then the log's checkpoint (background)", f"{done['seconds']:.3f} s",
             f"{done['frames']:,} pages of write-ahead log"
             + ("" if done["complete"] else ", not all copied"))]


def _written(label: str, w: dict[str, Any]) -> tuple[str, str, str]:
    return (label, f"{w['total']:.3f} s", ", ".join(
        f"{name} {w['seconds'][name]:.3f} s ({w['rows'][name]:,} rows)" for name in w["seconds"]))


def print_table(r: dict[str, Any]) -> None:
    n = r["customers"]
    first, steady, inc = r["first_full_tick"], r["steady_full_tick"], r["incremental_tick"]
    after, again = r["full_tick_after_incremental"], r["full_tick_a_minute_later"]
    rows = [
        ("first full tick (assigns every stage)", f"{first['seconds']:.3f} s",
         f"{first['stage_changes']:,} stage changes, {first['occurrences']:,} occurrences"),
        *_checkpointed(first),
        ("steady full tick (next day)", f"{steady['seconds']:.3f} s",
         f"{steady['stage_changes']:,} stage changes, {steady['occurrences']:,} occurrences"),
        *_checkpointed(steady),
        *([("  before it, a day of autovacuum (not timed)", f"{vacuum['seconds']:.1f} s",
             f"server's autovacuum {vacuum['server_autovacuum']}; "
             + _tables_done(vacuum["tables"]))]
          if (vacuum := r["autovacuum_before_steady_tick"]) else []),
        ("full tick after the incremental", f"{after['seconds']:.3f} s",
         f"{after['stage_changes']:,} stage changes, {after['occurrences']:,} occurrences"),
        ("full tick a minute later (scheduler)", f"{again['seconds']:.3f} s",
         f"{again['stage_changes']:,} stage changes, {again['occurrences']:,} occurrences"),
        (f"incremental tick ({r['ingest']['events']:,} changed)", f"{inc['seconds']:.3f} s",
         f"{inc['stage_changes']:,} stage changes, {inc['occurrences']:,} occurrences"),
        *_checkpointed(inc),
        ("  the process's first (compiles statements)",
         f"{r['incremental_tick_cold']['seconds']:.3f} s",
         f"{r['incremental_tick_cold']['changed']:,} changed"),
        (f"ingestion of the {r['ingest']['events']:,} visits", f"{r['ingest']['seconds']:.3f} s",
         "through engine.ingest, not a tick figure"),
        ("floor: the same selections in bare SQL", f"{r['floor']['total']:.3f} s",
         f"stages {r['floor']['seconds']['stages']:.3f} s + 20 triggers"),
        *(_written(f"writes of the {name} tick in bare SQL", r["writes"][name])
          for name in ("first", "steady")),
        ("steady tick / (floor + its writes)",
         f"{r['ratios']['steady_tick_over_floor_and_writes']:.2f}x",
         f"{r['floor']['total'] + r['writes']['steady']['total']:.3f} s"),
        ("naive: per customer in Python", f"{r['naive']['extrapolated_seconds']:.1f} s",
         f"{r['naive']['per_customer_ms']:.2f} ms/customer x {n:,} "
         f"(sample {r['naive']['sample']:,})"),
        ("steady tick / floor", f"{r['ratios']['steady_tick_over_floor']:.2f}x",
         f"first tick / floor {r['ratios']['first_tick_over_floor']:.2f}x"),
        ("naive / steady tick", f"{r['ratios']['naive_over_steady_tick']:.0f}x", ""),
        ("peak RSS of the tick processes", f"{r['memory']['peak_rss_mb']:.0f} MB",
         f"{r['memory']['after_imports_mb']:.0f} MB after imports"),
    ]
    machine = r["machine"]
    print(f"\n== {r['backend']}: {n:,} customers, 20 triggers "
          f"(data {r['data'].get('size_mb')} MB; targets are set for 1,000,000 customers)\n"
          f"   {machine['cpus']} x {machine['cpu']}, load average {machine['load_average'][0]} "
          f"when the run ended, {r['measured_at']}")
    width = max(len(a) for a, _, _ in rows)
    for label, value, note in rows:
        print(f"  {label:<{width}}  {value:>10}  {note}")
    for name, tick in (("steady full tick", steady), ("incremental tick", inc),
                       ("full tick a minute later", again)):
        print(f"  {name}: {tick['database_seconds']:.3f} s of {tick['seconds']:.3f} s in the "
              f"database, {tick['statements']} statements; the slowest:")
        for row in tick["slowest"][:5]:
            print(f"    {row['seconds']:8.3f} s  {row['statement'][:90]}")
    print(f"  {'target':<{width}}  {'value':>10}  {'limit':<10}  result")
    # what the machine takes to write a full tick's rows alone, next to the target it misses
    bare = {"first full tick": r["writes"]["first"]["total"],
            "steady full tick": r["writes"]["steady"]["total"]}
    for name, t in r["targets"].items():
        value = t["value"]
        shown = f"{value:.3f}" if value < 10 else f"{value:.1f}"
        note = (f" (its rows alone take {bare[name]:.3f} s to write in bare SQL)"
                if name in bare and not t["pass"] else "")
        print(f"  {name:<{width}}  {shown:>10}  {t['target']:<10}  "
              f"{'PASS' if t['pass'] else 'FAIL'}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"])
    parser.add_argument("--postgres-url", default=os.environ.get(ENV_URL))
    parser.add_argument("--naive-sample", type=int, default=2_000)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        payload = json.loads(args.payload or "{}")
        if args.phase == "full":
            out = phase_full(args.url)
        elif args.phase == "floor":
            out = phase_floor(args.url, payload["watermarks"], payload["sample"])
        elif args.phase == "repeated":
            out = phase_repeated(args.url)
        elif args.phase == "writes":
            out = phase_writes(args.url)
        else:
            out = phase_incremental(args.url)
        print(json.dumps(out, default=str))
        return

    backend = args.backend or ("both" if args.postgres_url else "sqlite")
    backends = ["sqlite", "postgresql"] if backend == "both" else [backend]
    if "postgresql" in backends and not args.postgres_url:
        raise SystemExit(f"PostgreSQL needs --postgres-url or {ENV_URL}")
    OUT.mkdir(exist_ok=True)
    results = []
    for name in backends:
        result = run_backend(name, args.customers, args.postgres_url, args.naive_sample)
        results.append(result)
        path = OUT / f"results-{name}-n{args.customers}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print_table(result)
        print(f"  written to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
