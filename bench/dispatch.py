"""The dispatch benchmark: messages per second through the real engine path to local fakes.

    python bench/dispatch.py                         # 5,000 messages per run, 128 threads
    python bench/dispatch.py -n 2000 --concurrency 128 --latencies 0 0.05

For each adapter (twilio_sms, sendgrid, telegram) and each fake latency, a fresh SQLite database
gets N customers; one tick of the evaluator queues one message each; a `Dispatcher` with
`--concurrency` threads drains the outbox through the real adapter and SDK to the fake provider,
which runs in its own process (so it does not share this process's GIL). Reported per run:
messages/s for the drain, and the adapter's send latency (p50/p99) as the dispatcher saw it.

The engine's own overhead is measured apart, draining to a no-op channel (sequential and with
the pool). The pacing check sends through a Twilio sender configured at `--pace` msg/s and
prints the measured rate, which should be within 5% of it.

Results print as a table and are saved to bench/out/dispatch-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
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

# adapter -> (fake module, fake class, channel name, customer contact field)
ADAPTERS = {
    "twilio_sms": ("tests.fakes.twilio", "FakeTwilio", "sms"),
    "sendgrid": ("tests.fakes.sendgrid", "FakeSendGrid", "email"),
    "telegram": ("tests.fakes.telegram", "FakeTelegram", "chat"),
}


# --- the fake provider, in a child process ------------------------------------------------------


def serve(adapter: str, latency: float) -> None:
    """Run one fake until stdin closes; print its URL first."""
    import importlib
    import logging

    logging.disable(logging.WARNING)
    module, cls, _ = ADAPTERS[adapter]
    fake = getattr(importlib.import_module(module), cls)()
    if latency > 0:
        fake.delay(latency)
    print(fake.start(), flush=True)
    sys.stdin.read()
    fake.stop()


@contextmanager
def fake_provider(adapter: str, latency: float) -> Iterator[str]:
    """A fake provider in a child process; its base URL."""
    child = subprocess.Popen([sys.executable, __file__, "--serve", adapter, "--latency",
                              str(latency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"the fake {adapter} did not start")
        yield url
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=15)


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

    return ProjectConfig(club=ClubFile.model_validate(load("club.yaml")),
                         lifecycle=LifecycleFile.model_validate(load("lifecycle.yaml")),
                         channels=ChannelsFile.model_validate(load("channels.yaml")))


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
        start = time.perf_counter()
        result = self.inner.send(message)
        end = time.perf_counter()
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

    clock = FixedClock(datetime(2026, 3, 2, 9, 0))
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


def drain(engine: Any, clock: Any, channel_name: str, channel: Any, concurrency: int,
          batch: int) -> tuple[Any, float]:
    from engine.dispatch import Dispatcher
    from engine.templates import TemplateStore

    dispatcher = Dispatcher(engine, TemplateStore(ROOT / "tests" / "testdata" / "templates"),
                            {channel_name: channel}, clock, club={"name": "Riverside"},
                            concurrency=concurrency)
    start = time.perf_counter()
    report = dispatcher.drain(batch)
    seconds = time.perf_counter() - start
    dispatcher.close()  # the pool, and the channel's connections
    return report, seconds


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


def run_adapter(workdir: Path, adapter: str, latency: float, n: int, concurrency: int,
                batch: int) -> dict[str, Any]:
    from channels.base import load_adapter

    channel_name = ADAPTERS[adapter][2]
    engine, clock, tick = queued_outbox(workdir, n, channel_name)
    with fake_provider(adapter, latency) as url:
        channel = Timed(load_adapter(adapter).from_config(channel_name,
                                                          settings_for(adapter, url)))
        report, seconds = drain(engine, clock, channel_name, channel, concurrency, batch)
    errors = not_sent_errors(engine)
    engine.dispose()
    return {"run": adapter, "latency_ms": latency * 1000, "messages": n, "sent": report.sent,
            "not_sent": errors,
            "concurrency": concurrency, "seconds": seconds, "rate": report.sent / seconds,
            "send_p50_ms": pct(channel.durations, 0.5) * 1000,
            "send_p99_ms": pct(channel.durations, 0.99) * 1000, "queue_tick_s": tick}


def run_noop(workdir: Path, n: int, concurrency: int, batch: int) -> dict[str, Any]:
    engine, clock, tick = queued_outbox(workdir, n, "email")
    report, seconds = drain(engine, clock, "email", NoOp(), concurrency, batch)
    engine.dispose()
    if report.sent != n:
        raise RuntimeError(f"noop: sent {report.sent} of {n}: {report}")
    return {"run": "noop (engine overhead)", "latency_ms": 0.0, "messages": n,
            "concurrency": concurrency, "seconds": seconds, "rate": n / seconds,
            "send_p50_ms": 0.0, "send_p99_ms": 0.0, "queue_tick_s": tick,
            "overhead_us_per_message": seconds / n * 1e6}


def run_pacing(workdir: Path, rate: float, n: int, concurrency: int) -> dict[str, Any]:
    from channels.base import load_adapter

    engine, clock, _ = queued_outbox(workdir, n, "sms")
    with fake_provider("twilio_sms", 0.0) as url:
        channel = Timed(load_adapter("twilio_sms").from_config("sms", settings_for(
            "twilio_sms", url, rate_per_second=rate, burst=1)))
        drain(engine, clock, "sms", channel, concurrency, n)
    engine.dispose()
    done = sorted(channel.finished)
    measured = (len(done) - 1) / (done[-1] - done[0])
    return {"configured_rate": rate, "messages": n, "concurrency": concurrency,
            "measured_rate": measured, "error": measured / rate - 1,
            "within_tolerance": abs(measured / rate - 1) <= PACE_TOLERANCE}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'run':<24}{'latency':>9}{'msgs':>7}{'threads':>9}{'seconds':>9}{'msg/s':>9}" \
           f"{'p50 ms':>9}{'p99 ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['run']:<24}{r['latency_ms']:>7.0f}ms{r['messages']:>7}"
                     f"{r['concurrency']:>9}{r['seconds']:>9.2f}{r['rate']:>9.0f}"
                     f"{r['send_p50_ms']:>9.1f}{r['send_p99_ms']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--batch", type=int, default=500, help="messages claimed per batch")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.05],
                        help="fake provider latencies, in seconds")
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--pace", type=float, default=50.0, help="msg/s for the pacing check")
    parser.add_argument("--pace-messages", type=int, default=150)
    parser.add_argument("--serve", choices=list(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.latency)
        return 0

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tp-dispatch-") as tmp:
        workdir = Path(tmp)
        steps: list[Callable[[], dict[str, Any]]] = [
            lambda: run_noop(workdir, args.messages, 1, args.batch),
            lambda: run_noop(workdir, args.messages, args.concurrency, args.batch)]
        for adapter in args.adapters:
            for latency in args.latencies:
                steps.append(lambda a=adapter, lat=latency: run_adapter(
                    workdir, a, lat, args.messages, args.concurrency, args.batch))
        for step in steps:
            rows.append(step())
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        pacing = run_pacing(workdir, args.pace, args.pace_messages, min(16, args.concurrency))

    print(table(rows))
    for r in rows:
        for error, count in r.get("not_sent", {}).items():
            print(f"{r['run']} at {r['latency_ms']:.0f} ms: {count} not sent: {error}")
        if "overhead_us_per_message" in r:
            print(f"engine overhead, {r['concurrency']} thread(s): "
                  f"{r['overhead_us_per_message']:.0f} us/message")
    at_50 = [r for r in rows if r["latency_ms"] >= 50]
    slow = [r["run"] for r in at_50 if r["rate"] < TARGET_RATE]
    if at_50:
        print(f"target >= {TARGET_RATE:.0f} msg/s at 50 ms: "
              + (f"missed by {', '.join(slow)}" if slow else "met"))
    print(f"pacing: configured {pacing['configured_rate']:.1f} msg/s, measured "
          f"{pacing['measured_rate']:.2f} msg/s ({pacing['error']:+.1%}); "
          f"{'within' if pacing['within_tolerance'] else 'OUTSIDE'} "
          f"{PACE_TOLERANCE:.0%}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    path = OUT / f"dispatch-{stamp}.json"
    path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                         if k not in ("serve", "latency")},
                                "python": sys.version.split()[0],
                                "runs": rows, "pacing": pacing,
                                "median_rate": statistics.median(r["rate"] for r in rows)},
                               indent=2))
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
