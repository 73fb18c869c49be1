"""The dispatch benchmark: messages per second through the real engine path to local fakes.

    python bench/dispatch.py                         # 5,000 messages per run, 128 threads
    python bench/dispatch.py -n 2000 --concurrency 128 --latencies 0 0.05
    python bench/dispatch.py --workers 2 --concurrency 64 --fake-processes 2 --pace 50 100

For each adapter (twilio_sms, sendgrid, telegram) and each fake latency, a fresh SQLite database
gets N customers; one tick of the evaluator queues one message each; a `Dispatcher` with
`--concurrency` threads drains the outbox through the real adapter and SDK to the fake provider,
which runs in `--fake-processes` processes of its own sharing one listening socket (so it does
not share the dispatcher's GIL, nor is capped by one of its own). With `--workers N`, N dispatcher
processes drain the same database at once, each with `--concurrency` threads; the clock starts
when all of them are ready. Reported per run: messages/s for the drain, the adapter's send
latency (p50/p99) as the dispatcher saw it, and the CPU time per message of the dispatcher
processes and of the fake's. Those two bound the rate: on a machine of C cores no configuration
sends faster than about C / (dispatcher + fake CPU per message), whatever the workers and threads.

The engine's own overhead is measured apart, draining to a no-op channel (sequential and with
the pool). The pacing check sends through a Twilio sender configured at each `--pace` msg/s
(from every worker process at once, pacing shared through the database when there are several)
and prints the measured rate, which should be within 5% of it.

Results print as a table and are saved to bench/out/dispatch-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out"
TARGET_RATE = 2000.0  # messages/s with 50 ms of provider latency
PACE_TOLERANCE = 0.05
NOW = datetime(2026, 3, 2, 9, 0)  # the bench's fixed clock

# adapter -> (fake module, fake class, channel name, customer contact field)
ADAPTERS = {
    "twilio_sms": ("tests.fakes.twilio", "FakeTwilio", "sms"),
    "sendgrid": ("tests.fakes.sendgrid", "FakeSendGrid", "email"),
    "telegram": ("tests.fakes.telegram", "FakeTelegram", "chat"),
}


# --- the fake provider, in a child process ------------------------------------------------------


def serve(adapter: str, latency: float, fd: int) -> None:
    """Run one fake on the listening socket `fd` until stdin closes; print its URL first."""
    import importlib
    import logging

    from tests.fakes.server import Served

    logging.disable(logging.WARNING)
    module, cls, _ = ADAPTERS[adapter]
    fake = getattr(importlib.import_module(module), cls)()
    if latency > 0:
        fake.delay(latency)
    fake.served = Served(fake.app(), sock=socket.socket(fileno=fd))
    print(fake.served.url, flush=True)
    sys.stdin.read()
    fake.stop()


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user and system) the processes `pids` have used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Served:
    """The fake's URL and its processes."""

    def __init__(self, url: str, pids: list[int]) -> None:
        self.url, self.pids = url, pids

    def cpu(self) -> float:
        return cpu_seconds(self.pids)


@contextmanager
def fake_provider(adapter: str, latency: float, processes: int = 1) -> Iterator[Served]:
    """A fake provider in `processes` child processes sharing one listening socket."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    fd = listener.fileno()
    children = [subprocess.Popen([sys.executable, __file__, "--serve", adapter, "--latency",
                                  str(latency), "--fd", str(fd)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT, pass_fds=(fd,))
                for _ in range(processes)]
    try:
        urls = set()
        for child in children:
            assert child.stdout is not None
            urls.add(child.stdout.readline().strip())
        if len(urls) != 1 or not next(iter(urls)).startswith("http"):
            raise RuntimeError(f"the fake {adapter} did not start: {urls}")
        yield Served(urls.pop(), [child.pid for child in children])
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        for child in children:
            child.wait(timeout=15)
        listener.close()


# --- the engine path ----------------------------------------------------------------------------


def settings_for(adapter: str, url: str, **extra: Any) -> dict[str, Any]:
    """Adapter settings pointing at the fake."""
    from tests.fakes.sendgrid import API_KEY
    from tests.fakes.telegram import BOT_TOKEN
    from tests.fakes.twilio import ACCOUNT_SID, AUTH_TOKEN

    base: dict[str, dict[str, Any]] = {
        "twilio_sms": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                       "from_number": "+15550001111", "base_url": url, "rate_per_second": None},
        "sendgrid": {"api_key": API_KEY, "from_email": "club@example.com", "host": url},
        "telegram": {"bot_token": BOT_TOKEN, "api_base": url, "rate_per_second": None},
    }
    return {**base[adapter], "timeout": 10.0, **extra}


def project_config() -> Any:
    from ruamel.yaml import YAML

    from engine.config import ChannelsFile, ClubFile, LifecycleFile, ProjectConfig

    def load(name: str) -> Any:
        return YAML(typ="safe", pure=True).load((ROOT / "config" / name).read_text("utf-8"))

    # the tests' open contact policy (when there is one): every customer gets the message
    from tests import conftest

    policy = getattr(conftest, "OPEN_POLICY", None)
    return ProjectConfig(club=ClubFile.model_validate(load("club.yaml")),
                         lifecycle=LifecycleFile.model_validate(load("lifecycle.yaml")),
                         channels=ChannelsFile.model_validate(load("channels.yaml")),
                         **({} if policy is None else {"policy": policy}))


class Timed:
    """Wraps a channel, recording each send's duration and completion time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.durations: list[float] = []
        self.finished: list[float] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def send(self, message: Any) -> Any:
        start = time.monotonic()  # system-wide: comparable across worker processes
        result = self.inner.send(message)
        end = time.monotonic()
        with self._lock:
            self.durations.append(end - start)
            self.finished.append(end)
        return result

    def close(self) -> None:
        self.inner.close()


class NoOp:
    """A channel that accepts everything at once: the engine's own cost."""

    name = "noop"

    def send(self, message: Any) -> Any:
        from channels.base import SendResult, SendStatus

        return SendResult(SendStatus.SENT, provider_message_id=f"noop-{message.message_id}")

    def close(self) -> None:
        pass


def queued_outbox(workdir: Path, n: int, channel: str) -> tuple[Any, Any, float]:
    """A fresh database with `n` messages queued on `channel`; (engine, clock, tick seconds)."""
    from engine.clock import FixedClock
    from engine.db import make_engine, migrate
    from engine.evaluation import Evaluator
    from engine.ingest import CustomerIn, Ingestor, MembershipIn
    from tests.conftest import make_trigger

    clock = FixedClock(NOW)
    path = workdir / f"dispatch-{channel}-{time.monotonic_ns()}.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    today = clock.now().date()
    ing = Ingestor(engine, clock)
    ing.customers([CustomerIn(external_id=f"c{i}", first_name=f"C{i}", email=f"c{i}@example.com",
                              phone=f"+1555{i:07d}", chat_id=str(10_000 + i)) for i in range(n)])
    ing.memberships([MembershipIn(external_id=f"m{i}", customer_external_id=f"c{i}",
                                  starts_on=today - timedelta(days=10),
                                  ends_on=today + timedelta(days=355)) for i in range(n)])
    trigger = make_trigger(id="welcome", when={"stage_entered": "onboarding"},
                           action={"channel": channel, "template": "test/hello"})
    start = time.perf_counter()
    queued = Evaluator(engine, project_config(), [trigger], clock).tick().messages
    tick = time.perf_counter() - start
    if queued != n:
        raise RuntimeError(f"queued {queued} messages, expected {n}")
    return engine, clock, tick


def make_dispatcher(engine: Any, clock: Any, channel_name: str, channel: Any, concurrency: int,
                    shared_pacing: bool = False) -> Any:
    from engine.dispatch import DatabaseBuckets, Dispatcher
    from engine.templates import TemplateStore

    return Dispatcher(engine, TemplateStore(ROOT / "tests" / "testdata" / "templates"),
                      {channel_name: channel}, clock, club={"name": "Riverside"},
                      concurrency=concurrency,
                      pacing=DatabaseBuckets(engine) if shared_pacing else None)


def drain(engine: Any, clock: Any, channel_name: str, channel: Any, concurrency: int,
          batch: int) -> tuple[Any, float, float]:
    """Drain in this process; the report, the seconds taken and the CPU seconds used."""
    dispatcher = make_dispatcher(engine, clock, channel_name, channel, concurrency)
    start, cpu = time.perf_counter(), time.process_time()
    report = dispatcher.drain(batch)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu  # every thread of this process
    dispatcher.close()  # the pool, and the channel's connections
    return report, seconds, cpu


def worker(db_url: str, adapter: str, url: str, extra: dict[str, Any], concurrency: int,
           batch: int, ready: Any, go: Any, results: Any) -> None:
    """One dispatcher process: build everything, say ready, wait for the start, drain."""
    from channels.base import load_adapter
    from engine.clock import FixedClock
    from engine.db import make_engine

    engine = make_engine(db_url)
    name = "email" if adapter == "noop" else ADAPTERS[adapter][2]
    inner = NoOp() if adapter == "noop" else load_adapter(adapter).from_config(
        name, settings_for(adapter, url, **extra))
    channel = Timed(inner)
    dispatcher = make_dispatcher(engine, FixedClock(NOW), name, channel, concurrency,
                                 shared_pacing=True)
    ready.put(True)
    go.wait()
    cpu = time.process_time()
    report = dispatcher.drain(batch)
    end, cpu = time.monotonic(), time.process_time() - cpu
    dispatcher.close()
    engine.dispose()
    results.put({"sent": report.sent, "claimed": report.claimed, "end": end, "cpu": cpu,
                 "durations": channel.durations, "finished": channel.finished})


def collect(queue: Any, procs: list[Any], count: int) -> list[Any]:
    """`count` items from `queue`, failing as soon as a process died without sending its own."""
    import queue as queues

    out: list[Any] = []
    while len(out) < count:
        try:
            out.append(queue.get(timeout=1))
        except queues.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError("a dispatcher process failed (its traceback is above)") \
                    from None
    return out


def drain_in_processes(engine: Any, adapter: str, url: str, workers: int, concurrency: int,
                       batch: int, **extra: Any) -> tuple[list[dict[str, Any]], float]:
    """Drain with `workers` dispatcher processes at once; their results and the seconds taken."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(str(engine.url), adapter, url, extra, concurrency,
                                              batch, ready, go, results))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    collect(ready, procs, len(procs))
    start = time.monotonic()
    go.set()
    out = collect(results, procs, len(procs))
    for proc in procs:
        proc.join(timeout=30)
    return out, max(r["end"] for r in out) - start


def not_sent_errors(engine: Any) -> dict[str, int]:
    """The errors of messages that did not end `sent`, counted."""
    from sqlalchemy import func, select

    from engine.models import Message

    with engine.connect() as conn:
        return {f"{status}: {error}": int(count) for status, error, count in conn.execute(
            select(Message.status, Message.last_error, func.count())
            .where(Message.status != "sent").group_by(Message.status, Message.last_error))}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- runs ---------------------------------------------------------------------------------------


def run_adapter(workdir: Path, adapter: str, latency: float, n: int, workers: int,
                concurrency: int, batch: int, fake_processes: int) -> dict[str, Any]:
    from channels.base import load_adapter

    channel_name = ADAPTERS[adapter][2]
    engine, clock, tick = queued_outbox(workdir, n, channel_name)
    with fake_provider(adapter, latency, fake_processes) as fake:
        fake_cpu = fake.cpu()
        if workers == 1:
            channel = Timed(load_adapter(adapter).from_config(channel_name,
                                                              settings_for(adapter, fake.url)))
            report, seconds, cpu = drain(engine, clock, channel_name, channel, concurrency,
                                         batch)
            sent, durations = report.sent, channel.durations
        else:
            results, seconds = drain_in_processes(engine, adapter, fake.url, workers,
                                                  concurrency, batch)
            sent = sum(r["sent"] for r in results)
            durations = [d for r in results for d in r["durations"]]
            cpu = sum(r["cpu"] for r in results)
        fake_cpu = fake.cpu() - fake_cpu
    errors = not_sent_errors(engine)
    engine.dispose()
    return {"run": adapter, "latency_ms": latency * 1000, "messages": n, "sent": sent,
            "not_sent": errors, "workers": workers, "fake_processes": fake_processes,
            "concurrency": concurrency, "seconds": seconds, "rate": sent / seconds,
            "send_p50_ms": pct(durations, 0.5) * 1000,
            "send_p99_ms": pct(durations, 0.99) * 1000, "queue_tick_s": tick,
            "dispatcher_cpu_us": cpu / n * 1e6, "fake_cpu_us": fake_cpu / n * 1e6}


def run_noop(workdir: Path, n: int, workers: int, concurrency: int,
             batch: int) -> dict[str, Any]:
    engine, clock, tick = queued_outbox(workdir, n, "email")
    if workers == 1:
        report, seconds, cpu = drain(engine, clock, "email", NoOp(), concurrency, batch)
        sent = report.sent
    else:
        results, seconds = drain_in_processes(engine, "noop", "", workers, concurrency, batch)
        sent, cpu = sum(r["sent"] for r in results), sum(r["cpu"] for r in results)
    engine.dispose()
    if sent != n:
        raise RuntimeError(f"noop: sent {sent} of {n}")
    return {"run": "noop (engine overhead)", "latency_ms": 0.0, "messages": n,
            "workers": workers, "concurrency": concurrency, "seconds": seconds,
            "rate": n / seconds, "send_p50_ms": 0.0, "send_p99_ms": 0.0, "queue_tick_s": tick,
            "overhead_us_per_message": seconds / n * 1e6, "dispatcher_cpu_us": cpu / n * 1e6,
            "fake_cpu_us": 0.0}


def run_pacing(workdir: Path, rate: float, n: int, workers: int,
               concurrency: int) -> dict[str, Any]:
    """Send `n` messages through one Twilio sender paced at `rate`, from every worker at once."""
    from channels.base import load_adapter

    engine, clock, _ = queued_outbox(workdir, n, "sms")
    paced = {"rate_per_second": rate, "burst": 1}
    with fake_provider("twilio_sms", 0.0) as fake:
        url = fake.url
        if workers == 1:
            channel = Timed(load_adapter("twilio_sms").from_config("sms", settings_for(
                "twilio_sms", url, **paced)))
            drain(engine, clock, "sms", channel, concurrency, n)
            done = sorted(channel.finished)
        else:
            # one claim each, so that every worker holds its share of the sender's messages and
            # they all reserve the sender's slots at once
            batch = -(-n // workers)
            results, _ = drain_in_processes(engine, "twilio_sms", url, workers, concurrency,
                                            batch, **paced)
            done = sorted(t for r in results for t in r["finished"])
    engine.dispose()
    measured = (len(done) - 1) / (done[-1] - done[0])
    return {"configured_rate": rate, "messages": n, "workers": workers,
            "concurrency": concurrency, "measured_rate": measured, "error": measured / rate - 1,
            "within_tolerance": abs(measured / rate - 1) <= PACE_TOLERANCE}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'run':<24}{'latency':>9}{'msgs':>7}{'workers':>8}{'threads':>8}{'seconds':>9}" \
           f"{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us/msg':>12}{'fake':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['run']:<24}{r['latency_ms']:>7.0f}ms{r['messages']:>7}"
                     f"{r['workers']:>8}{r['concurrency']:>8}{r['seconds']:>9.2f}{r['rate']:>9.0f}"
                     f"{r['send_p50_ms']:>9.1f}{r['send_p99_ms']:>9.1f}"
                     f"{r['dispatcher_cpu_us']:>12.0f}{r['fake_cpu_us']:>7.0f}")
    return "\n".join(lines)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, carrying every repetition's rate."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    return {**ordered[(len(ordered) - 1) // 2], "rates": [r["rate"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="dispatcher processes")
    parser.add_argument("--concurrency", type=int, default=128, help="threads per worker")
    parser.add_argument("--batch", type=int, default=500, help="messages claimed per batch")
    parser.add_argument("--fake-processes", type=int, default=2,
                        help="processes serving the fake provider")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each measurement; the median is reported")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.05],
                        help="fake provider latencies, in seconds")
    parser.add_argument("--adapters", nargs="*", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--skip-noop", action="store_true", help="skip the engine-overhead runs")
    parser.add_argument("--pace", type=float, nargs="*", default=[50.0, 100.0],
                        help="msg/s for the pacing checks (none: skip them)")
    parser.add_argument("--pace-messages", type=int, default=0,
                        help="messages per pacing check (default: 5 seconds' worth)")
    parser.add_argument("--serve", choices=list(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.latency, args.fd)
        return 0

    rows: list[dict[str, Any]] = []
    pacing: list[dict[str, Any]] = []
    n, w, c, b = args.messages, args.workers, args.concurrency, args.batch
    with tempfile.TemporaryDirectory(prefix="tp-dispatch-") as tmp:
        workdir = Path(tmp)
        steps: list[Callable[[], dict[str, Any]]] = []
        if not args.skip_noop:
            steps += [lambda: run_noop(workdir, n, 1, 1, b), lambda: run_noop(workdir, n, w, c, b)]
        for adapter in args.adapters:
            for latency in args.latencies:
                steps.append(lambda a=adapter, lat=latency: run_adapter(
                    workdir, a, lat, n, w, c, b, args.fake_processes))
        for step in steps:
            rows.append(median_run([step() for _ in range(args.repeat)]))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        for rate in args.pace:
            messages = args.pace_messages or int(5 * rate)
            runs = [run_pacing(workdir, rate, messages, w, min(16, c))
                    for _ in range(args.repeat)]
            middle = sorted(runs, key=lambda r: abs(r["error"]))[(len(runs) - 1) // 2]
            pacing.append({**middle, "errors": [r["error"] for r in runs]})

    print(table(rows))
    for r in rows:
        if len(r["rates"]) > 1:
            print(f"{r['run']} at {r['latency_ms']:.0f} ms: msg/s of each run: "
                  + ", ".join(f"{x:.0f}" for x in r["rates"]))
        for error, count in r.get("not_sent", {}).items():
            print(f"{r['run']} at {r['latency_ms']:.0f} ms: {count} not sent: {error}")
        if "overhead_us_per_message" in r:
            print(f"engine overhead, {r['workers']} worker(s) x {r['concurrency']} thread(s): "
                  f"{r['overhead_us_per_message']:.0f} us/message")
    at_50 = [r for r in rows if r["latency_ms"] >= 50]
    slow = [r["run"] for r in at_50 if r["rate"] < TARGET_RATE]
    if at_50:
        print(f"target >= {TARGET_RATE:.0f} msg/s at 50 ms: "
              + (f"missed by {', '.join(slow)}" if slow else "met"))
    for p in pacing:
        print(f"pacing, {p['workers']} worker(s) x {p['concurrency']} threads: configured "
              f"{p['configured_rate']:.1f} msg/s, measured {p['measured_rate']:.2f} msg/s "
              f"({p['error']:+.1%}); {'within' if p['within_tolerance'] else 'OUTSIDE'} "
              f"{PACE_TOLERANCE:.0%}"
              + (f" (each run: {', '.join(f'{e:+.1%}' for e in p['errors'])})"
                 if len(p["errors"]) > 1 else ""))
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = OUT / f"dispatch-{stamp}.json"
    path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                         if k not in ("serve", "latency", "fd")},
                                "python": sys.version.split()[0],
                                "runs": rows, "pacing": pacing,
                                "median_rate": statistics.median(r["rate"] for r in rows)
                                if rows else None},
                               indent=2))
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
