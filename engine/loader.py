"""Loading rule files and config with every problem reported as `file:line:col: ...`.

Each trigger is validated on its own, so one broken trigger never takes down the others of its
file: it is reported, listed in `RuleSet.broken`, and left out of `RuleSet.triggers`. Meaning is
checked as well as shape: duplicate ids across files, unknown stages, channels and templates,
templates that use fields a customer does not have, and every condition compiled.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.conditions import Condition, ConditionError, compile_condition
from engine.config import ChannelsFile, ClubFile, LifecycleFile, ProjectConfig
from engine.rulefile import FORMAT_VERSION, RuleFile, Trigger
from engine.templates import TemplateStore
from engine.yamlsource import YamlDocument, read_yaml

__all__ = [
    "Diagnostic",
    "LoadedTrigger",
    "RuleFileSource",
    "RuleSet",
    "check_project",
    "load_config",
    "load_rules",
    "rule_file_schema",
]


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem: `path:line:col: trigger <id>: <field>: <message>`."""

    path: str
    line: int
    col: int
    message: str
    trigger: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}:{self.col}: "
        if self.trigger:
            where += f"trigger {self.trigger}: "
        if self.field:
            where += f"{self.field}: "
        return where + self.message


@dataclass(frozen=True)
class RuleFileSource:
    sha256: str
    text: str


@dataclass
class LoadedTrigger:
    """A valid trigger with its conditions compiled."""

    trigger: Trigger
    conditions: list[Condition]
    path: str
    line: int
    sha256: str


@dataclass
class RuleSet:
    """The valid triggers, every diagnostic, the files read, and the triggers disabled."""

    config: ProjectConfig
    triggers: list[LoadedTrigger] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: dict[str, RuleFileSource] = field(default_factory=dict)
    broken: dict[str, list[Diagnostic]] = field(default_factory=dict)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_path(data: Any, loc: tuple[str | int, ...], kind: str = "") -> tuple[str | int, ...]:
    """The part of a pydantic `loc` that exists in the data (drops union tags and the like)."""
    out: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            out.append(part)
            node = node[part]  # type: ignore[index]
        elif index == len(loc) - 1 and isinstance(part, str) and kind in (
                "missing", "extra_forbidden"):
            out.append(part)  # the missing or unknown key itself
        # anything else is a union member's tag, not a key of the data
    return tuple(out)


def _fields(model: Any, path: tuple[str | int, ...]) -> list[str]:
    """Field names of the model that `path` points into, for did-you-mean suggestions."""
    names: list[str] = []
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        info = getattr(current, "model_fields", {}).get(part) if current is not None else None
        if info is None:
            current = None
            continue
        current = _model_of(info.annotation)
    if current is not None and hasattr(current, "model_fields"):
        names = list(current.model_fields)
    return names


def _model_of(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false",
               "list": "a list", "dict": "a mapping", "model": "a mapping"}


def _message(err: Any, model: Any, path: tuple[str | int, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(path[-1])
        known = _fields(model, path[:-1])
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else \
            (f" (expected one of: {', '.join(known)})" if known else "")
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"missing required key '{path[-1]}'"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "enum":
        return f"expected one of {ctx.get('expected')}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} does not match the pattern {ctx.get('pattern')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": "at least", "greater_than": "greater than",
                 "less_than_equal": "at most", "less_than": "less than"}[kind]
        limit = next(iter(ctx.values()), "")
        return f"must be {bound} {limit}, got {err.get('input')!r}"
    if kind in ("too_short", "too_long"):
        return str(err["msg"]).replace("List", "list").replace("Value", "value")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        wanted = _TYPE_WORDS.get(kind.split("_")[0], kind.split("_")[0])
        return f"expected {wanted}, got {err.get('input')!r}"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return str(err["msg"])


def _validation_diagnostics(exc: ValidationError, model: Any, data: Any, doc: YamlDocument,
                            base: tuple[str | int, ...], file: str, trigger: str | None,
                            field_offset: int) -> list[Diagnostic]:
    out = []
    errors = exc.errors()
    paths = [_data_path(data, tuple(e["loc"]), e["type"]) for e in errors]
    for err, path in zip(errors, paths, strict=True):
        # A mapping given where a union also allows a plain value: the mapping branch's error
        # says what is wrong, the plain branch's "expected one of" does not.
        if isinstance(err.get("input"), dict) and err["type"] in (
                "enum", "literal_error", "string_type", "str_type") and \
                sum(1 for p in paths if p[:len(path)] == path) > 1:
            continue
        if err["type"] == "missing":
            parent = (*base, *path[:-1])
            line, col = doc.position((*parent, "<value>") if (*parent, "<value>") in
                                     doc.positions else parent)
        elif err["type"] == "extra_forbidden" or (*base, *path, "<value>") not in doc.positions:
            line, col = doc.position((*base, *path))
        else:
            line, col = doc.position((*base, *path, "<value>"))
        field_path = path[field_offset:]
        out.append(Diagnostic(file, line, col, _message(err, model, path), trigger,
                              _dotted(field_path) or None))
    return out


def _condition_diagnostic(exc: ConditionError, doc: YamlDocument, path: tuple[str | int, ...],
                          raw: str, file: str, trigger: str | None, field_name: str) -> Diagnostic:
    line, col = doc.position(path)
    source_line = _source_line(doc, line)
    # Point inside the string: quoted scalars start one column later.
    at = col - 1
    if source_line is not None and 0 <= at < len(source_line) and source_line[at] in "\"'":
        col += 1
    return Diagnostic(file, line, col + exc.offset, str(exc), trigger, field_name)


def _source_line(doc: YamlDocument, line: int) -> str | None:
    lines = doc.text.splitlines() if doc.text else []
    return lines[line - 1] if 0 < line <= len(lines) else None


# --- config ------------------------------------------------------------------------------------


def load_config(config_dir: Path) -> tuple[ProjectConfig | None, list[Diagnostic]]:
    """Read club.yaml, lifecycle.yaml and channels.yaml; None when any is broken."""
    diags: list[Diagnostic] = []
    parts: dict[str, Any] = {}
    for name, model in (("club", ClubFile), ("lifecycle", LifecycleFile),
                        ("channels", ChannelsFile)):
        path = Path(config_dir) / f"{name}.yaml"
        shown = _display(path)
        if not path.is_file():
            diags.append(Diagnostic(shown, 1, 1, "missing config file"))
            continue
        doc = read_yaml(path)
        diags.extend(Diagnostic(shown, p.line, p.col, p.message) for p in doc.problems)
        if doc.fatal or doc.problems:
            continue
        try:
            parts[name] = model.model_validate(doc.data)
        except ValidationError as exc:
            diags.extend(_validation_diagnostics(exc, model, doc.data, doc, (), shown, None, 0))
            continue
        if name == "lifecycle":
            for i, stage in enumerate(doc.data.get("stages") or []):
                for j, text in enumerate(stage.get("conditions") or []):
                    try:
                        compile_condition(text)
                    except ConditionError as exc:
                        diags.append(_condition_diagnostic(
                            exc, doc, ("stages", i, "conditions", j), text, shown, None,
                            f"stages[{i}].conditions[{j}]"))
    if diags or len(parts) < 3:
        return None, sorted(diags)
    return ProjectConfig(parts["club"], parts["lifecycle"], parts["channels"]), []


# --- rules -------------------------------------------------------------------------------------


def load_rules(rules_dir: Path, *, config: ProjectConfig, templates: TemplateStore) -> RuleSet:
    """Every rule file under `rules_dir`; broken triggers disabled, all problems reported."""
    ruleset = RuleSet(config=config)
    files = sorted([*Path(rules_dir).rglob("*.yaml"), *Path(rules_dir).rglob("*.yml")])
    first_seen: dict[str, tuple[str, int, int]] = {}
    stages = list(config.stages)
    channels = list(config.channels.channels)
    attributes = list(config.club.attributes)
    for path in files:
        shown = _display(path)
        text = path.read_text(encoding="utf-8", errors="replace")
        sha = hashlib.sha256(text.encode()).hexdigest()
        doc = read_yaml(path)
        fatal = [Diagnostic(shown, p.line, p.col, p.message) for p in doc.problems] \
            if doc.fatal else []
        if fatal:
            ruleset.diagnostics.extend(fatal)
            continue
        ruleset.files[shown] = RuleFileSource(sha, text)
        data = doc.data
        if not isinstance(data, dict):
            ruleset.diagnostics.append(Diagnostic(
                shown, 1, 1, "expected a mapping with version: and triggers:"))
            continue
        header = {k: v for k, v in data.items() if k != "triggers"}
        header["triggers"] = []
        try:
            RuleFile.model_validate(header)
        except ValidationError as exc:
            ruleset.diagnostics.extend(
                _validation_diagnostics(exc, RuleFile, header, doc, (), shown, None, 0))
            if "version" not in data or data.get("version") != FORMAT_VERSION:
                continue
        items = data.get("triggers")
        if items is None:
            continue
        if not isinstance(items, list):
            line, col = doc.position(("triggers",))
            ruleset.diagnostics.append(Diagnostic(shown, line, col, "expected a list of triggers",
                                                  None, "triggers"))
            continue
        # Scalar problems (e.g. ambiguous numbers) belong to the trigger around them.
        starts = [doc.position(("triggers", i))[0] for i in range(len(items))]
        scalar_problems: dict[int | None, list[Diagnostic]] = {}
        for p in doc.problems:
            owner = max((i for i, s in enumerate(starts) if s <= p.line), default=None)
            scalar_problems.setdefault(owner, []).append(Diagnostic(shown, p.line, p.col,
                                                                    p.message))
        ruleset.diagnostics.extend(scalar_problems.get(None, []))
        for i, item in enumerate(items):
            base = ("triggers", i)
            line, col = doc.position(base)
            tid = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) \
                else None
            diags = [Diagnostic(d.path, d.line, d.col, d.message, tid) for d in
                     scalar_problems.get(i, [])]
            trig: Trigger | None = None
            if not isinstance(item, dict):
                diags.append(Diagnostic(shown, line, col, "expected a trigger mapping", tid))
            else:
                try:
                    trig = Trigger.model_validate(item)
                except ValidationError as exc:
                    diags.extend(_validation_diagnostics(exc, Trigger, item, doc, base, shown,
                                                         tid, 0))
            conditions: list[Condition] = []
            if isinstance(item, dict):
                raw_conditions = item.get("conditions")
                if isinstance(raw_conditions, list):
                    for j, text_ in enumerate(raw_conditions):
                        if not isinstance(text_, str):
                            continue
                        try:
                            conditions.append(compile_condition(text_))
                        except ConditionError as exc:
                            diags.append(_condition_diagnostic(
                                exc, doc, (*base, "conditions", j), text_, shown, tid,
                                f"conditions[{j}]"))
            if isinstance(item, dict):
                diags.extend(_semantic(item, tid, doc, base, shown, stages, channels, attributes,
                                       templates))
            if tid is not None:
                if tid in first_seen:
                    fp, fl, fc = first_seen[tid]
                    id_line, id_col = doc.position((*base, "id"))
                    diags.append(Diagnostic(shown, id_line, id_col,
                                            f"duplicate trigger id '{tid}' (first defined at "
                                            f"{fp}:{fl}:{fc})", tid, "id"))
                else:
                    first_seen[tid] = (shown, *doc.position((*base, "id")))
            if diags:
                ruleset.diagnostics.extend(diags)
                if tid is not None:
                    ruleset.broken.setdefault(tid, []).extend(diags)
                continue
            assert trig is not None
            ruleset.triggers.append(LoadedTrigger(trig, conditions, shown, line, sha))
    # Which of two triggers with one id should run is anyone's guess: neither does.
    duplicated = {d.trigger for d in ruleset.diagnostics if d.field == "id" and
                  d.message.startswith("duplicate trigger id")}
    for loaded in [t for t in ruleset.triggers if t.trigger.id in duplicated]:
        ruleset.triggers.remove(loaded)
        ruleset.broken.setdefault(loaded.trigger.id, [])
    ruleset.diagnostics.sort()
    return ruleset


def _semantic(item: dict[str, Any], tid: str | None, doc: YamlDocument,
              base: tuple[str | int, ...], file: str, stages: list[str], channels: list[str],
              attributes: list[str], templates: TemplateStore) -> list[Diagnostic]:
    """Meaning checks on the raw trigger mapping, so they run even when its shape is broken."""
    out: list[Diagnostic] = []

    def report(path: tuple[str | int, ...], message: str) -> None:
        line, col = doc.position((*base, *path, "<value>")) \
            if (*base, *path, "<value>") in doc.positions else doc.position((*base, *path))
        out.append(Diagnostic(file, line, col, message, tid, _dotted(path)))

    def unknown(kind: str, value: str, known: list[str]) -> str:
        close = difflib.get_close_matches(value, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown {kind} '{value}' ({hint}known: {', '.join(known)})"

    stage = item.get("stage")
    for j, value in enumerate(stage if isinstance(stage, list) else [stage]):
        if isinstance(value, str) and value not in stages:
            report(("stage", j) if isinstance(stage, list) else ("stage",),
                   unknown("stage", value, stages))
    when = item.get("when")
    if isinstance(when, dict) and isinstance(when.get("stage_entered"), str) and \
            when["stage_entered"] not in stages:
        report(("when", "stage_entered"), unknown("stage", when["stage_entered"], stages))
    raw_action = item.get("action")
    action: dict[str, Any] = raw_action if isinstance(raw_action, dict) else {}
    channel = action.get("channel")
    raw_fallback = action.get("fallback")
    fallback: list[Any] = raw_fallback if isinstance(raw_fallback, list) else []
    if isinstance(channel, str) and channel not in channels:
        report(("action", "channel"), unknown("channel", channel, channels))
    for j, ch in enumerate(fallback):
        if isinstance(ch, str) and ch not in channels:
            report(("action", "fallback", j), unknown("channel", ch, channels))
    usable = [c for c in [channel, *fallback] if isinstance(c, str) and c in channels]
    template = action.get("template")
    if isinstance(template, str):
        for problem in _template_problems(templates, template, usable, attributes):
            report(("action", "template"), problem)
    raw_variants = item.get("variants")
    variants: dict[str, Any] = raw_variants if isinstance(raw_variants, dict) else {}
    for name, variant in variants.items():
        if not isinstance(variant, dict):
            continue
        v_channel = variant.get("channel")
        if isinstance(v_channel, str) and v_channel not in channels:
            report(("variants", name, "channel"), unknown("channel", v_channel, channels))
        v_template = variant.get("template")
        if isinstance(v_template, str):
            first = v_channel if isinstance(v_channel, str) else channel
            chans = [c for c in [first, *fallback] if isinstance(c, str) and c in channels]
            for problem in _template_problems(templates, v_template, chans, attributes):
                report(("variants", name, "template"), problem)
    return out


def _template_problems(templates: TemplateStore, name: str, channels: list[str],
                       attributes: list[str]) -> list[str]:
    """Problems of a template on each channel it may be sent on, each problem once."""
    problems: dict[str, None] = {}
    for ch in dict.fromkeys(channels):
        found = templates.check(name, ch, attributes)
        if found and found[0].startswith("unknown template") and problems:
            continue
        problems.update(dict.fromkeys(found))
    return list(problems)


# --- the whole project -------------------------------------------------------------------------


def check_project(rules_dir: Path, templates_dir: Path, config_dir: Path,
                  known_adapters: set[str] | None = None,
                  ) -> tuple[RuleSet | None, list[Diagnostic]]:
    """Config then rules; every diagnostic together (config first)."""
    config, diags = load_config(Path(config_dir))
    if config is None:
        return None, diags
    if known_adapters is not None:
        channels_path = _display(Path(config_dir) / "channels.yaml")
        doc = read_yaml(Path(config_dir) / "channels.yaml")
        for name, ch in config.channels.channels.items():
            if ch.adapter not in known_adapters:
                line, col = doc.position(("channels", name, "adapter", "<value>"))
                diags.append(Diagnostic(
                    channels_path, line, col,
                    f"unknown channel adapter '{ch.adapter}' (known: "
                    f"{', '.join(sorted(known_adapters))})", None, f"channels.{name}.adapter"))
        if diags:
            return None, diags
    ruleset = load_rules(Path(rules_dir), config=config, templates=TemplateStore(templates_dir))
    return ruleset, [*diags, *ruleset.diagnostics]


def rule_file_schema() -> dict[str, Any]:
    """JSON Schema of the rule-file format, generated from the pydantic models."""
    schema: dict[str, Any] = json.loads(json.dumps(RuleFile.model_json_schema(mode="validation")))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Touchpoints rule file"
    _loosen_strings(schema)
    return schema


def _loosen_strings(node: Any) -> None:
    """Durations, times of day and shares are written as strings ("30d", "10:00", "10%")."""
    if isinstance(node, dict):
        fmt = node.get("format")
        if fmt in ("duration", "time"):
            node.pop("format")
            node["type"] = "string"
            node["pattern"] = r"^\d+\s*[mhdw]$" if fmt == "duration" else r"^\d\d:\d\d$"
        for value in node.values():
            _loosen_strings(value)
    elif isinstance(node, list):
        for value in node:
            _loosen_strings(value)
