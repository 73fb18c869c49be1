"""Wiring: settings -> database, config, rule set, evaluator, ingestor, dispatcher.

The CLI, the API, the scheduler and the demo all start from `Runtime.load`, so they see the same
rules, the same config and the same broken-trigger report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from channels.base import Channel, adapter_names, load_adapter
from channels.ratelimit import BucketStore
from engine.clock import Clock, SystemClock
from engine.config import ProjectConfig
from engine.db import make_engine, migrate
from engine.dispatch import Dispatcher, build_channels
from engine.evaluation import Evaluator
from engine.ingest import Ingestor
from engine.loader import Diagnostic, RuleSet, check_project
from engine.settings import Settings
from engine.templates import TemplateStore
from engine.unsubscribe import unsubscribe_url_builder

__all__ = ["ConfigError", "Runtime"]


class ConfigError(RuntimeError):
    """The config directory is broken: nothing can run until it is fixed."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("\n".join(str(d) for d in diagnostics))
        self.diagnostics = diagnostics


@dataclass
class Runtime:
    """Everything a running engine needs, built once."""

    settings: Settings
    clock: Clock
    engine: Engine
    config: ProjectConfig
    ruleset: RuleSet
    diagnostics: list[Diagnostic]
    templates: TemplateStore
    evaluator: Evaluator
    ingestor: Ingestor
    channel_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: Settings | None = None, clock: Clock | None = None, *,
             engine: Engine | None = None, migrate_db: bool = True,
             channel_overrides: dict[str, dict[str, Any]] | None = None) -> Runtime:
        """Read config and rules, open (and migrate) the database. Broken triggers are reported
        in `diagnostics` and recorded as disabled; a broken config raises ConfigError."""
        settings = settings or Settings()
        clock = clock or SystemClock()
        ruleset, diagnostics = check_project(
            settings.rules_dir, settings.templates_dir, settings.config_dir,
            known_adapters=set(adapter_names()))
        if ruleset is None:
            raise ConfigError(diagnostics)
        config = ruleset.config
        if engine is None:
            settings.ensure_var_dir()
            engine = make_engine(settings.database_url,
                                 sqlite_synchronous=settings.sqlite_synchronous)
        if migrate_db:
            migrate(engine)
        files = {path: (src.sha256, src.text) for path, src in ruleset.files.items()}
        evaluator = Evaluator(engine, config, ruleset.triggers, clock, files=files)
        evaluator.record_broken({tid: [str(d) for d in diags]
                                 for tid, diags in ruleset.broken.items()})
        return cls(settings, clock, engine, config, ruleset, diagnostics,
                   TemplateStore(settings.templates_dir), evaluator, Ingestor(engine, clock),
                   dict(channel_overrides or {}))

    def channels(self) -> dict[str, Channel]:
        overrides = {k: dict(v) for k, v in self.channel_overrides.items()}
        errors_file = self.settings.config_dir / "provider_errors.yaml"
        for name, ch in self.config.channels.channels.items():
            mine = overrides.setdefault(name, {})
            if ch.adapter == "console" and self.settings.console_outbox_path is not None:
                mine.setdefault("path", str(self.settings.console_outbox_path))
            # Providers' error codes are data of this project's config, not of the package.
            if "errors_file" in load_adapter(ch.adapter).Settings.model_fields:
                mine.setdefault("errors_file", str(errors_file))
        return build_channels(self.config.channels, overrides)

    def dispatcher(self, channels: dict[str, Channel] | None = None, *,
                   concurrency: int = 1, pacing: BucketStore | None = None) -> Dispatcher:
        return Dispatcher(
            self.engine, self.templates, channels or self.channels(), self.clock,
            club={"name": self.config.club.name},
            trigger_descriptions={t.trigger.id: t.trigger.description
                                  for t in self.ruleset.triggers},
            trigger_purposes={t.trigger.id: t.trigger.purpose for t in self.ruleset.triggers},
            concurrency=concurrency, pacing=pacing,
            unsubscribe_url=unsubscribe_url_builder(self.settings, self.config.channels))
