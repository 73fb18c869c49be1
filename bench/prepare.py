"""Generated databases, cached: a pristine copy per N, generator version and schema version.

SQLite: the generated file lives in `bench/out/` and each run works on a fresh copy of it.
PostgreSQL: the generated data lives in a sibling database `<name>_n<N>_<key>`, and each run
recreates the database named in the URL from it with `CREATE DATABASE ... TEMPLATE` (so the
database in the URL is dropped and recreated: give the benchmark a database of its own).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import generate
from sqlalchemy.engine import make_url

from engine.db import make_engine, migrate

__all__ = ["OUT", "cache_key", "prepare_postgres", "prepare_sqlite"]

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().with_name("out")
MIGRATIONS = ROOT / "engine" / "migrations" / "versions"


def cache_key() -> str:
    """The generator version and a digest of the migrations: a schema change regenerates."""
    digest = hashlib.sha256()
    for path in sorted(MIGRATIONS.glob("*.py")):
        digest.update(path.read_bytes())
    return f"g{generate.GENERATOR_VERSION}-{digest.hexdigest()[:10]}"


def _progress(label: str) -> Callable[[int, int], None]:
    started = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            last[0] = now
            print(f"  {label}: {done:,}/{total:,} customers, {now - started:.0f} s",
                  file=sys.stderr, flush=True)

    return report


def prepare_sqlite(n: int) -> tuple[Path, dict[str, Any]]:
    """A fresh working copy of the generated database for n customers, and generation facts."""
    OUT.mkdir(exist_ok=True)
    cached = OUT / f"gen-n{n}-{cache_key()}.db"
    info: dict[str, Any] = {"cached": cached.exists()}
    if not cached.exists():
        for stale in OUT.glob(f"gen-n{n}-*.db"):
            stale.unlink()
        partial = cached.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        started = time.perf_counter()
        engine = make_engine(f"sqlite:///{partial}")
        migrate(engine)
        engine.dispose()
        for suffix in ("-wal", "-shm"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        info["rows"] = generate.load_sqlite(str(partial), n, _progress("sqlite"))
        info["generation_seconds"] = round(time.perf_counter() - started, 1)
        partial.rename(cached)
    work = OUT / f"run-n{n}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{work}{suffix}").unlink(missing_ok=True)
    started = time.perf_counter()
    shutil.copyfile(cached, work)
    info["copy_seconds"] = round(time.perf_counter() - started, 1)
    info["size_mb"] = round(cached.stat().st_size / 2**20)
    return work, info


def _admin(url: str) -> Any:
    import psycopg

    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres")
    return psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True)


def prepare_postgres(url: str, n: int) -> tuple[str, dict[str, Any]]:
    """Recreate the URL's database from the cached generated one (generated first if missing)."""
    import psycopg

    parsed = make_url(url)
    name = parsed.database
    if not name or name in ("postgres", "template0", "template1", "test"):
        raise SystemExit(f"refusing to drop and recreate database {name!r}: give the benchmark a "
                         "database of its own, e.g. .../tp_bench")
    template = f"{name}_n{n}_{cache_key().replace('-', '_')}"
    info: dict[str, Any] = {}
    with _admin(url) as admin:
        existing = {r[0] for r in admin.execute("SELECT datname FROM pg_database")}
        ready = False
        if template in existing:
            ready = _has_marker(parsed.set(database=template).render_as_string(False))
        info["cached"] = ready
        if not ready:
            for stale in existing:
                if stale.startswith(f"{name}_n{n}_") or stale == template:
                    admin.execute(f'DROP DATABASE "{stale}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{template}"')
            started = time.perf_counter()
            gen_url = parsed.set(database=template).render_as_string(hide_password=False)
            engine = make_engine(gen_url)
            migrate(engine)
            engine.dispose()
            with psycopg.connect(_plain(gen_url)) as conn:
                info["rows"] = generate.load_postgres(conn, n, _progress("postgresql"))
                conn.autocommit = True
                conn.execute("VACUUM ANALYZE")
                conn.execute("CREATE TABLE bench_generated (n BIGINT, key TEXT)")
                conn.execute("INSERT INTO bench_generated VALUES (%s, %s)", (n, cache_key()))
            info["generation_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        info["copy_seconds"] = round(time.perf_counter() - started, 1)
        size = admin.execute("SELECT pg_database_size(%s)", (template,)).fetchone()
        info["size_mb"] = round(size[0] / 2**20) if size else None
    return url, info


def _plain(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _has_marker(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(_plain(url)) as conn:
            row = conn.execute("SELECT count(*) FROM bench_generated").fetchone()
            return bool(row and row[0])
    except psycopg.Error:
        return False
