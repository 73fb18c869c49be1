"""Database engines, migrations and the small shared primitives (counters, leases)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Table, create_engine, delete, event, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

from engine.models import Counter, Lease
from engine.models import table as model_table

__all__ = ["Checkpoint", "WalCheckpointer", "analyze_if_grown", "analyze_scratch", "bump_counter",
           "collection_paused", "empty_scratch", "make_engine", "migrate", "read_counter",
           "release_lease", "take_lease"]

MIGRATIONS = Path(__file__).with_name("migrations")

log = logging.getLogger(__name__)


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL", **kwargs: Any) -> Engine:
    """An engine with the settings the tick relies on (WAL and a busy timeout on SQLite)."""
    if sqlite_synchronous not in ("OFF", "NORMAL", "FULL"):
        raise ValueError(f"sqlite_synchronous: expected OFF, NORMAL or FULL, "
                         f"got {sqlite_synchronous!r}")
    # The tick counts what INSERT ... SELECT wrote; keep rowcount for every statement.
    kwargs.setdefault("execution_options", {"preserve_rowcount": True})
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30})
        eng = create_engine(url, **kwargs)

        @event.listens_for(eng, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # SQLAlchemy issues BEGIN itself, so that it can be BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # A tick writes tens of thousands of rows in one transaction: a 64 MiB page cache
            # keeps their pages in memory until commit instead of spilling them to the WAL
            # again and again. Temporary b-trees (GROUP BY, the rows of an UPDATE ... FROM) go
            # to temporary files with their own small cache: in memory they grow with the base
            # (the first tick of a million customers materialises a million stage changes).
            cur.execute("PRAGMA cache_size=-65536")
            cur.execute("PRAGMA temp_store=FILE")
            cur.close()

        @event.listens_for(eng, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the lock up front, so two ticks serialise instead of failing to upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return eng
    kwargs.setdefault("pool_pre_ping", True)
    # The tick's statements are planned with costs in the millions at a million customers,
    # far over jit_above_cost: compiling them took 0.3-0.7 s each, more than running them.
    connect_args = dict(kwargs.get("connect_args", {}))
    connect_args["options"] = f"{connect_args.get('options', '')} -c jit=off".strip()
    kwargs["connect_args"] = connect_args
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, **kwargs)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a SQLite write-ahead log, as `PRAGMA wal_checkpoint` reports it."""

    frames: int  # the frames in the log (-1: none counted, see `busy`)
    copied: int  # the frames now in the database file
    seconds: float
    # another connection was checkpointing, or the database keeps no log: nothing was done
    busy: bool = False

    @property
    def complete(self) -> bool:
        """Every frame copied (fewer: a reader still needed the rest)."""
        return not self.busy and self.copied == self.frames


class WalCheckpointer:
    """Checkpoints a SQLite database's write-ahead log on a thread of its own.

    A commit that leaves more than `wal_autocheckpoint` pages (1,000) in the log copies them into
    the database file before it returns: after a tick's tens of thousands of pages, a large share
    of the tick's time. The tick commits with that off (`quiet`) and asks this for the checkpoint,
    which runs after it, on another connection, while the dispatcher already reads what the tick
    committed; PostgreSQL's checkpointer process does the same for its ticks. Requests arriving
    while a checkpoint runs are served by one more checkpoint after it. The thread is not a
    daemon: a process that ticks once and exits finishes the checkpoint first.

    A checkpoint is PASSIVE: it copies what no reader still needs and waits for nobody, so a
    long-running reader leaves part of the log for the next one (`Checkpoint.complete`).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last: Checkpoint | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False

    @staticmethod
    def applies(engine: Engine) -> bool:
        """True for a SQLite database in a file (an in-memory one has no write-ahead log)."""
        return engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")

    @staticmethod
    @contextmanager
    def quiet(conn: Connection) -> Iterator[None]:
        """The connection's commits inside the block leave the log as it is (no automatic
        checkpoint); its setting before the block is restored after it."""
        raw = conn.connection.driver_connection
        assert raw is not None
        pages = raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        raw.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            raw.execute(f"PRAGMA wal_autocheckpoint={int(pages)}")

    def request(self) -> None:
        """Checkpoint soon, on the checkpointer's thread; returns at once."""
        with self._lock:
            if self._thread is not None:
                self._again = True
                return
            self._thread = threading.Thread(target=self._run, name="wal-checkpoint")
            self._thread.start()

    def wait(self) -> Checkpoint | None:
        """Wait until no checkpoint is running or requested; the latest one."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return self.last
            thread.join()

    def checkpoint(self) -> Checkpoint:
        """Checkpoint now, on the caller's thread."""
        started = time.perf_counter()
        raw = self.engine.raw_connection()
        try:
            # the connection runs in autocommit (`make_engine`): no transaction around the pragma
            busy, frames, copied = raw.cursor().execute(
                "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            raw.close()
        self.last = Checkpoint(int(frames), int(copied), time.perf_counter() - started,
                               busy=bool(busy) or frames < 0)
        return self.last

    def _run(self) -> None:
        while True:
            try:
                self.checkpoint()
            except Exception:
                # the log stays as it is; the next request, or a commit's own checkpoint, retries
                log.exception("checkpoint of the write-ahead log failed")
            with self._lock:
                if not self._again:
                    self._thread = None
                    return
                self._again = False


class _CollectionPause:
    """Python's cyclic garbage collector held off while any write transaction that asked for it
    is open (`collection_paused`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._resume = False  # the collector was on when the first block began

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._open == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0 and self._resume:
                    gc.enable()


# A full collection of a running engine's heap takes 17-110 ms (measured in the benchmark's
# incremental ticks at a million customers). Landing inside a tick or an ingestion batch, it
# holds the transaction, and with it SQLite's only write lock (PostgreSQL's row locks), open
# that much longer. Blocks wrapped in this (on any thread, nested or not) run without it; the
# collector resumes when the last one ends, so the collection it owes runs after the commit. A
# collector the process had turned off stays off.
collection_paused = _CollectionPause()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    command.upgrade(alembic_config(engine), "head")


def bump_counter(conn: Connection, name: str) -> int:
    """Increment a named counter inside the caller's transaction and return the new value."""
    row = conn.execute(
        update(Counter).where(Counter.name == name).values(value=Counter.value + 1)
        .returning(Counter.value)
    ).first()
    if row is None:
        conn.execute(insert(Counter).values(name=name, value=1))
        return 1
    return int(row[0])


def read_counter(conn: Connection, name: str) -> int:
    value = conn.execute(select(Counter.value).where(Counter.name == name)).scalar()
    return int(value or 0)


def take_lease(conn: Connection, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
    """Take or renew the named lease; False while another holder's lease is still valid."""
    taken = conn.execute(
        update(Lease)
        .where(Lease.name == name)
        .where((Lease.holder == holder) | (Lease.holder.is_(None)) | (Lease.expires_at < now))
        .values(holder=holder, expires_at=now + ttl)
    ).rowcount
    if taken:
        return True
    # The first lease of a database: two processes may both find no row; one insert wins.
    table = model_table(Lease)
    first = (pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table))
    created = conn.execute(first.values(name=name, holder=holder, expires_at=now + ttl)
                           .on_conflict_do_nothing()).rowcount
    return bool(created)


def release_lease(conn: Connection, name: str, holder: str) -> None:
    conn.execute(
        update(Lease).where(Lease.name == name, Lease.holder == holder)
        .values(holder=None, expires_at=None)
    )


def analyze_if_grown(conn: Connection, name: str, changed: int, *,
                     also: tuple[str, ...] = (), share: float = 0.1) -> bool:
    """ANALYZE `name` (and `also`) on PostgreSQL when this transaction wrote `changed` of its rows,
    more than 50 + `share` of the rows it had (autovacuum's threshold with the default share): the
    statements after it, in this tick or the next before autovacuum comes round, are planned on
    statistics that know the new rows. SQLite's statistics carry no per-value frequencies that
    would mislead it."""
    if conn.dialect.name != "postgresql" or changed <= 50:
        return False
    rows = conn.exec_driver_sql(
        f"SELECT reltuples FROM pg_class WHERE oid = '{name}'::regclass").scalar()
    if changed <= 50 + share * max(float(rows or 0), 0.0):
        return False
    conn.exec_driver_sql(f"ANALYZE {', '.join((name, *also))}")
    return True


def empty_scratch(conn: Connection, scratch: Table) -> None:
    """Make the temporary table `scratch` (and its indexes) exist on this connection, empty.

    Kept per connection and emptied per use: creating and dropping it each time would change the
    schema, and SQLite re-prepares every statement after that. PostgreSQL gets TRUNCATE: a DELETE
    would leave dead rows behind, and autovacuum never visits temporary tables."""
    conn.execute(CreateTable(scratch, if_not_exists=True))
    for index in sorted(scratch.indexes, key=lambda i: str(i.name)):
        conn.execute(CreateIndex(index, if_not_exists=True))
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"TRUNCATE {scratch.name}")
    else:
        conn.execute(delete(scratch))


def analyze_scratch(conn: Connection, scratch: Table, columns: Sequence[str]) -> None:
    """On PostgreSQL, ANALYZE the temporary table `scratch`, once filled, on `columns`:
    autovacuum never visits temporary tables, and without statistics the planner guesses their
    size and spread (SQLite plans without per-value statistics either way)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {scratch.name} ({', '.join(columns)})")
