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


@app.command("import")
def import_(kind: ImportKind, path: Path) -> None:
    """Import a CSV export (customers, memberships or visits); bad rows are reported, good kept."""
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
def dispatch(now: NowOpt = None) -> None:
    """Send every due message in the outbox once."""
    runtime = _runtime(_settings(), _clock(now))
    report = runtime.dispatcher().drain()
    _json(report.__dict__)


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
                                      runtime.clock.now(), only=trigger)
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
    if report["messages"]:
        out.print("\n[bold]messages[/]")
        for msg in report["messages"]:
            trail = " -> ".join(o["status"] for o in msg["outcomes"])
            out.print(f"  #{msg['id']} {msg['created_at']:%Y-%m-%d %H:%M} {msg['trigger']} via "
                      f"{msg['channel']}: {msg['status']} ({trail})", highlight=False)


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


@app.command()
def demo(members: int = 300, days: int = 30, seed: int = 7,
         workdir: Path = Path("var/demo")) -> None:
    """The fitness-club demo: a generated club, a month on a virtual clock, a summary."""
    from engine.demo import run_demo

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("simulating days", total=days)
        report = run_demo(members=members, days=days, seed=seed, workdir=workdir,
                          progress=lambda done, _total: progress.update(task, completed=done))
    table = Table("trigger", "messages", title="Messages per trigger")
    for trig, n in sorted(report.messages_by_trigger.items(), key=lambda kv: -kv[1]):
        table.add_row(trig, str(n))
    out.print(table)
    out.print("channels: " + ", ".join(f"{k} {v}" for k, v in
                                       sorted(report.messages_by_channel.items())))
    out.print(f"held out: {report.held_out}, skipped (no contact point): {report.skipped}")
    out.print("stages now: " + ", ".join(f"{k} {v}" for k, v in sorted(report.stages.items())))
    out.print(f"{report.members} members, {report.renewals} renewals, {report.lapses} lapses, "
              f"{report.ticks} ticks over {report.days} days in {report.seconds:.1f} s")
    out.print(f"messages sent (console channel): {report.outbox_path}")
    out.print(f"database: {report.database_url}")


if __name__ == "__main__":
    app()
