"""The `touchpoints` command line."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.clock import Clock, FixedClock, SystemClock
from engine.settings import Settings

app = typer.Typer(help="Touchpoints: lifecycle trigger rules, evaluated set-wise, sent through "
                       "channels.", no_args_is_help=True, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

RulesOpt = Annotated[Path | None, typer.Option("--rules", help="rules directory")]
TemplatesOpt = Annotated[Path | None, typer.Option("--templates", help="templates directory")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="config directory")]
NowOpt = Annotated[datetime | None, typer.Option(
    "--now", help="evaluate at this instant (UTC, ISO 8601) instead of the wall clock")]


def _settings(rules: Path | None = None, templates: Path | None = None,
              config: Path | None = None) -> Settings:
    overrides: dict[str, Any] = {}
    if rules is not None:
        overrides["rules_dir"] = rules
    if templates is not None:
        overrides["templates_dir"] = templates
    if config is not None:
        overrides["config_dir"] = config
    return Settings(**overrides)


def _clock(now: datetime | None) -> Clock:
    return FixedClock(now) if now is not None else SystemClock()


def _runtime(settings: Settings, clock: Clock) -> Any:
    from engine.runtime import ConfigError, Runtime

    try:
        runtime = Runtime.load(settings, clock)
    except ConfigError as exc:
        for d in exc.diagnostics:
            err.print(str(d), markup=False, highlight=False)
        raise typer.Exit(2) from None
    for d in runtime.diagnostics:
        err.print(f"[yellow]disabled:[/] {d}", highlight=False)
    return runtime


def _wide(renderable: Any) -> None:
    """Print a wide table whole, even when stdout is not a terminal (rich's default is 80)."""
    Console(file=out.file, width=max(out.width, 120)).print(renderable)


def _json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


@app.command()
def check(rules: RulesOpt = None, templates: TemplatesOpt = None, config: ConfigOpt = None) -> None:
    """Check rule files, templates and config; every error, exit 1 if any."""
    from channels.base import adapter_names
    from engine.loader import check_project

    s = _settings(rules, templates, config)
    ruleset, diagnostics = check_project(s.rules_dir, s.templates_dir, s.config_dir,
                                         known_adapters=set(adapter_names()))
    for d in diagnostics:
        out.print(str(d), markup=False, highlight=False)
    n = len(ruleset.triggers) if ruleset is not None else 0
    if diagnostics:
        err.print(f"{len(diagnostics)} error(s); {n} trigger(s) valid")
        raise typer.Exit(1)
    err.print(f"ok: {n} trigger(s) in {len(ruleset.files) if ruleset else 0} file(s)")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the rule-file format (for editors)."""
    from engine.loader import rule_file_schema

    print(json.dumps(rule_file_schema(), indent=2))


class ImportKind(StrEnum):
    customers = "customers"
    memberships = "memberships"
    visits = "visits"
    consents = "consents"


@app.command("import")
def import_(kind: ImportKind, path: Path) -> None:
    """Import a CSV export (customers, memberships, visits or consents); bad rows are reported,
    good rows kept."""
    from engine.importer import import_csv

    runtime = _runtime(_settings(), SystemClock())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task(f"importing {path.name}", total=None)
        report = import_csv(runtime, str(kind), path,
                            progress=lambda n: progress.update(task, completed=n))
    for e in report.errors:
        err.print(str(e), markup=False, highlight=False)
    out.print(f"{report.read} read, {report.written} written, {report.rejected} rejected")
    if report.rejected:
        raise typer.Exit(1)


@app.command()
def preview(trigger: str, sample: int = 10, now: NowOpt = None) -> None:
    """Who the trigger would fire for now, and who matches its conditions at all."""
    runtime = _runtime(_settings(), _clock(now))
    try:
        result = runtime.evaluator.preview(trigger, sample=sample)
    except LookupError as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    out.print(f"[bold]{trigger}[/]: would fire for {result['would_fire']} "
              f"({result['would_send']} to send, {result['held_out']} held out, "
              f"{result['skipped']} skipped); {result['matching_conditions']} match its stage "
              "and conditions")
    table = Table("customer", "arm", "variant", "channel", "status")
    for row in result["sample"]:
        table.add_row(row["external_id"], row["arm"], row["variant"] or "", row["channel"] or "",
                      row["status"])
    out.print(table)


@app.command()
def tick(dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
         incremental: Annotated[bool, typer.Option("--incremental")] = False,
         now: NowOpt = None,
         wait: Annotated[float, typer.Option(
             help="seconds to wait while another process is ticking")] = 60.0) -> None:
    """Run one tick: stages, every enabled trigger, occurrences and outbox."""
    import time

    from engine.evaluation import TickBusy, TickKind

    runtime = _runtime(_settings(), _clock(now))
    deadline = time.monotonic() + wait
    while True:
        try:
            result = runtime.evaluator.tick(
                kind=TickKind.INCREMENTAL if incremental else TickKind.FULL, dry_run=dry_run)
            break
        except TickBusy as exc:
            if time.monotonic() >= deadline:
                err.print(str(exc))
                raise typer.Exit(3) from None
            time.sleep(0.2)
    _json(result.as_dict())


@app.command()
def dispatch(now: NowOpt = None,
             workers: Annotated[int, typer.Option(
                 min=1, help="dispatcher processes; they pace shared senders together")] = 1,
             concurrency: Annotated[int, typer.Option(
                 min=1, help="sending threads per process")] = 1) -> None:
    """Send every due message in the outbox once."""
    settings = _settings()
    runtime = _runtime(settings, _clock(now))  # checks the config, migrates the database once
    if workers == 1:
        dispatcher = runtime.dispatcher(concurrency=concurrency)
        try:
            report = dispatcher.drain()
        finally:
            dispatcher.close()
        _json(report.__dict__)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from engine.dispatch import DispatchReport

    runtime.engine.dispose()
    total = DispatchReport()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_drain_worker, [settings] * workers, [now] * workers,
                             [concurrency] * workers):
            total.add(part)
    _json(total.__dict__)


def _drain_worker(settings: Settings, now: datetime | None, concurrency: int) -> Any:
    """One process of `dispatch --workers`: drain with senders paced through the database."""
    from engine.dispatch import DatabaseBuckets
    from engine.runtime import Runtime

    runtime = Runtime.load(settings, _clock(now), migrate_db=False)
    dispatcher = runtime.dispatcher(concurrency=concurrency,
                                    pacing=DatabaseBuckets(runtime.engine))
    try:
        return dispatcher.drain()
    finally:
        dispatcher.close()
        runtime.engine.dispose()


@app.command()
def explain(customer: str, trigger: Annotated[str | None, typer.Argument()] = None,
            as_json: Annotated[bool, typer.Option("--json")] = False,
            now: NowOpt = None) -> None:
    """Why a customer did or did not get each trigger: stage, conditions with values, messages."""
    from engine.explain import explain_customer

    runtime = _runtime(_settings(), _clock(now))
    with runtime.engine.connect() as conn:
        try:
            report = explain_customer(conn, customer, runtime.ruleset.triggers,
                                      runtime.evaluator.lifecycle, runtime.config.club.timezone,
                                      runtime.clock.now(), only=trigger,
                                      policy=runtime.config.policy,
                                      channels=list(runtime.config.channels.channels))
        except LookupError as exc:
            err.print(str(exc))
            raise typer.Exit(1) from None
    if as_json:
        _json(report)
        return
    c, st = report["customer"], report["stage"]
    out.print(f"[bold]{c['external_id']}[/] {c['first_name'] or ''} ({report['time_zone']}) - "
              f"stage {st['recorded']} (now computes {st['computed_now']})")
    if report["membership"]:
        m = report["membership"]
        out.print(f"membership {m['external_id']}: {m['plan']} {m['starts_on']} .. {m['ends_on']} "
                  f"({m['status']})")
    for h in st["history"]:
        out.print(f"  {h['entered_at']:%Y-%m-%d %H:%M} entered {h['stage']}")
    for t in report["triggers"]:
        out.print(f"\n[bold]{t['trigger']}[/]: {t['verdict']}", highlight=False)
        for cond in t["conditions"]:
            mark = "[green]pass[/]" if cond["passed"] else "[red]FAIL[/]"
            values = ", ".join(f"{k}={v!r}" for k, v in cond["values"].items())
            out.print(f"  {mark} {cond['condition']}  ({values})", highlight=False)
    if report["consent"]:
        out.print("\n[bold]consent[/]")
        for entry in report["consent"]:
            since = f" since {entry['since']:%Y-%m-%d}" if entry["since"] else ""
            word = "[green]yes[/]" if entry["granted"] else "[red]no[/]"
            out.print(f"  {entry['channel']} {entry['purpose']}: {word} ({entry['source']}"
                      f"{since})", highlight=False)
    if report["decisions"]:
        out.print("\n[bold]policy decisions[/]")
        for d in report["decisions"]:
            out.print(f"  {d['at']:%Y-%m-%d %H:%M} {d['trigger']}: {d['status']}: {d['reason']}",
                      highlight=False)
    if report["messages"]:
        out.print("\n[bold]messages[/]")
        for msg in report["messages"]:
            trail = " -> ".join(o["status"] for o in msg["outcomes"]) or "no outcome yet"
            due = f", due {msg['due_at']:%Y-%m-%d %H:%M}" if msg["due_at"] != msg["created_at"] \
                else ""
            out.print(f"  #{msg['id']} {msg['created_at']:%Y-%m-%d %H:%M} {msg['trigger']} via "
                      f"{msg['channel']}: {msg['status']}{due} ({trail})", highlight=False)


@app.command()
def run(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the scheduler, the dispatcher and the HTTP API in one process."""
    import uvicorn

    from engine.api import create_app
    from engine.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runtime = _runtime(_settings(), SystemClock())
    scheduler = Scheduler(runtime, blocking=False)
    scheduler.start()
    try:
        uvicorn.run(create_app(runtime), host=host, port=port)
    finally:
        scheduler.shutdown()


class StatsFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


@app.command()
def stats(format: Annotated[StatsFormat, typer.Option(
              "--format", help="output")] = StatsFormat.TABLE,
          window_days: Annotated[int | None, typer.Option(
              "--window-days", help="re-score every goal with this window")] = None,
          now: NowOpt = None) -> None:
    """Per trigger and variant: treated vs holdout conversion, lift with 95% CI, p-value;
    CSV and JSON add the breakdowns by stage, channel, segment and rule-file version."""
    from engine.stats import compute_stats, goals_of, render_csv, render_json, render_table

    runtime = _runtime(_settings(), _clock(now))
    result = compute_stats(runtime.engine, goals_of(runtime.ruleset.triggers), as_of=now,
                           window_days=window_days)
    if format is StatsFormat.CSV:
        typer.echo(render_csv(result), nl=False)
    elif format is StatsFormat.JSON:
        typer.echo(render_json(result))
    else:
        _wide(render_table(result))


@app.command()
def backtest(start: Annotated[datetime, typer.Option("--from", help="first day (YYYY-MM-DD)")],
             end: Annotated[datetime, typer.Option("--to", help="last day (YYYY-MM-DD)")],
             rules: RulesOpt = None,
             scratch: Annotated[Path | None, typer.Option(
                 help="scratch SQLite file (default: a temporary one)")] = None,
             hour: Annotated[int, typer.Option(
                 help="tick hour (UTC) when the range has no stored ticks")] = 17,
             per_day: Annotated[bool, typer.Option("--per-day", help="a row per day")] = False,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Replay the stored history with the given rule files on a virtual clock into a scratch
    database: what would have gone out per day and trigger, on which channels, and what the
    contact policy stopped. Nothing is sent."""
    from engine.backtest import run_backtest

    settings = _settings()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("replaying ticks", total=None)
        report = run_backtest(settings, start.date(), end.date(), rules_dir=rules,
                              scratch=scratch, hour=hour,
                              progress=lambda done, total: progress.update(
                                  task, completed=done, total=total))
    if as_json:
        _json(report.as_dict())
        return
    rows = report.days if per_day else list(report.totals().values())
    table = Table(*(["day"] if per_day else []), "trigger", "messages", "channels", "held out",
                  "stopped (reason)", title=f"Backtest {report.start} .. {report.end} "
                  f"({report.ticks} ticks, rules {report.rules_dir})")
    for row in rows:
        table.add_row(*([row.day.isoformat()] if per_day else []), row.trigger_id,
                      str(row.messages),
                      ", ".join(f"{k} {v}" for k, v in sorted(row.channels.items())),
                      str(row.held_out),
                      ", ".join(f"{k} {v}" for k, v in sorted(row.stopped.items())))
    _wide(table)


@app.command()
def demo(members: Annotated[int | None, typer.Option(help="club size (config/demo.yaml)")] = None,
         months: Annotated[int | None, typer.Option(help="months replayed")] = None,
         seed: Annotated[int | None, typer.Option(help="random seed")] = None,
         workdir: Path = Path("var/demo")) -> None:
    """The fitness-club demo: a simulated club lives a year on a virtual clock through the engine;
    then the per-trigger statistics against the planted effects, and an HTML report."""
    from engine.demo import run_demo
    from engine.stats import render_table

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("simulating days", total=None)
        report = run_demo(members=members, months=months, seed=seed, workdir=workdir,
                          progress=lambda done, total: progress.update(
                              task, completed=done, total=total))
    out.print("channels: " + ", ".join(f"{k} {v}" for k, v in
                                       sorted(report.messages_by_channel.items())))
    out.print(f"{report.members} members, {sum(report.messages_by_trigger.values())} messages, "
              f"{report.held_out} held out, {report.skipped} not sent (contact policy, no "
              f"contact point), "
              f"{report.renewals} renewals, {report.lapses} lapses; {report.ticks} ticks over "
              f"{report.days} days")
    if report.stats is not None:
        _wide(render_table(report.stats, report.config.planted()))
    out.print(f"messages sent (console channel): {report.outbox_path}")
    out.print(f"database: {report.database_url}")
    if report.report_path is not None:
        out.print(f"report: {report.report_path}")
    s = report.summary
    out.print(f"time: ticks {s.tick_seconds:.1f} s, dispatch {s.dispatch_seconds:.1f} s, club "
              f"simulation and ingestion {s.other_seconds:.1f} s, statistics and report "
              f"{report.stats_seconds:.1f} s")
    out.print(f"total run time: {report.seconds:.1f} s")

if __name__ == "__main__":
    app()
