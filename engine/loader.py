"""Loading rule files and config with every problem reported as `file:line:col: ...`.

    rules/renewal.yaml:12:7: trigger renewal-14d: action.tmpl: unknown key 'tmpl' (did you
    mean 'template'?)

Each trigger is validated on its own, so one broken trigger never takes down the others of its
file: it is reported, listed in `RuleSet.broken`, and left out of `RuleSet.triggers`. A file whose
top level is broken (syntax, version, `triggers` not a list) contributes no triggers. Meaning is
checked as well as shape: duplicate ids across files (both triggers are disabled: which one was
meant is anyone's guess), stages, channels and their adapters, templates and the fields they
use, and every condition compiled, with the column inside the condition's text.

A broken config (`config/*.yaml`) stops everything: `load_config` then returns None.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import MaxLen
from pydantic import BaseModel, Tag, ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails

from engine.conditions import Condition, ConditionError, compile_condition
from engine.config import (
    ChannelsFile,
    ClubFile,
    LifecycleFile,
    PolicyFile,
    ProjectConfig,
    StageDef,
)
from engine.rulefile import FORMAT_VERSION, Action, RuleFile, Trigger, Variant
from engine.templates import TemplateStore
from engine.yamlsource import YamlDocument, YamlPath, read_yaml

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


@dataclass(frozen=True)
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
        if self.trigger is not None:
            where += f"trigger {self.trigger}: "
        if self.field:
            where += f"{self.field}: "
        return where + self.message


def _order(d: Diagnostic) -> tuple[str, int, int]:
    return (d.path, d.line, d.col)


@dataclass(frozen=True)
class RuleFileSource:
    """A rule file as read: its content and the sha256 of its bytes."""

    sha256: str
    text: str


@dataclass
class LoadedTrigger:
    """A valid trigger with its conditions compiled, and where it was defined."""

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
    """`path` relative to the working directory when it is inside it, else as given."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(os.getcwd())).as_posix()
    except ValueError:
        return str(path)


def _dotted(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _got(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a bound of 0.0 reads as 0
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "an empty mapping" if not value else "a mapping"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return repr(value)


def _suggest(value: Any, known: Iterable[str]) -> str | None:
    if not isinstance(value, str):
        return None
    close = difflib.get_close_matches(value, list(known), n=1)
    return close[0] if close else None


def _unknown(kind: str, value: str, known: list[str]) -> str:
    close = _suggest(value, known)
    hint = f"did you mean '{close}'? " if close else ""
    return f"unknown {kind} '{value}' ({hint}known: {', '.join(known)})"


# --- pydantic errors onto the YAML --------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    """A pydantic `loc` walked through the model types and the data side by side."""

    path: YamlPath  # the part of the loc that exists in the data
    owner: type[BaseModel] | None  # the model whose field (or unknown key) the loc ends at
    field_name: str | None  # that field
    site: tuple[YamlPath, str] | None  # the first union on the way: its data path and branch
    annotation: Any  # the type at the end of the loc


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while get_origin(tp) is Annotated:
        args = get_args(tp)
        tp, metadata = args[0], [*metadata, *args[1:]]
    return tp, metadata


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _branch(tag: str, members: list[Any]) -> Any | None:
    """The union member a pydantic loc tag names ('relative', 'EveryScope', 'list[str]', ...)."""
    for member in members:
        inner, metadata = _unwrap(member)
        if any(isinstance(m, Tag) and m.tag == tag for m in metadata):
            return inner
    for member in members:
        inner, _ = _unwrap(member)
        origin = get_origin(inner)
        if getattr(inner, "__name__", None) == tag or \
                (origin is not None and tag.startswith(f"{origin.__name__}[")) or \
                ("enum" in tag and isinstance(inner, type) and issubclass(inner, str)
                 and inner is not str) or \
                (tag.startswith("literal[") and origin is Literal):
            return inner
    for member in members:
        if _unwrap(member)[0] is str and tag.endswith("str"):
            return str
    return None


def _child(node: Any, item: str | int) -> tuple[bool, Any]:
    if isinstance(node, dict) and item in node:
        return True, node[item]
    if isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
        return True, node[item]
    return False, None


def _locate(model: type[BaseModel], data: Any, loc: tuple[str | int, ...]) -> _Located:
    tp: Any = model
    node, present = data, True
    path: list[str | int] = []
    owner: type[BaseModel] | None = None
    field_name: str | None = None
    site: tuple[YamlPath, str] | None = None
    i = 0
    while i < len(loc):
        item = loc[i]
        inner, _ = _unwrap(tp)
        if _is_union(inner):
            members = [m for m in get_args(inner) if m is not type(None)]
            chosen = _branch(item, members) if isinstance(item, str) else None
            if chosen is not None:  # a union tag: a step in the types, not in the data
                site = site or (tuple(path), str(item))
                tp, i = chosen, i + 1
                continue
            if len(members) == 1:  # Optional[X]: no tag in the loc
                tp = members[0]
                continue
            tp = Any
        if _is_model(inner):
            owner, field_name = inner, str(item)
            info = inner.model_fields.get(str(item))
            tp = info.annotation if info is not None else Any
        elif get_origin(inner) is dict:
            if item == "[key]":
                i += 1
                continue
            tp = get_args(inner)[1]
        elif get_origin(inner) in (list, tuple, set):
            tp = (get_args(inner) or (Any,))[0]
        else:
            tp = Any
        # Past a missing key (the end of a `missing` loc) nothing more is in the data.
        present, node = _child(node, item) if present else (False, None)
        if present:
            path.append(item)
        i += 1
    return _Located(tuple(path), owner, field_name, site, tp)


# Errors that only say "this branch of a union wants another type".
_MISMATCH = {"enum", "literal_error", "string_type", "int_type", "int_parsing", "float_type",
             "float_parsing", "bool_type", "bool_parsing", "list_type", "dict_type", "model_type",
             "model_attributes_type", "none_required", "is_instance_of"}
_NOUNS = {"string_type": "text", "int_type": "a whole number", "int_parsing": "a whole number",
          "int_from_float": "a whole number", "float_type": "a number",
          "float_parsing": "a number", "bool_type": "true or false",
          "bool_parsing": "true or false", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "model_attributes_type": "a mapping",
          "none_required": "nothing"}
# What a union field takes, in the words of the rule-file reference.
_UNION_HINTS = {"once": "per_cycle, ever, per_event or {every: <duration>}",
                "stage": "a stage name or a list of stage names"}
_PATTERNS: dict[tuple[type[BaseModel], str], str] = {
    (Trigger, "id"): "a trigger id is lower-case letters, digits, '_', '.' and '-', starting "
                     "with a letter or digit",
    (Action, "template"): "a template name is letters, digits, '_', '.', '/' and '-', such as "
                          "renewal/reminder",
    (Variant, "template"): "a template name is letters, digits, '_', '.', '/' and '-', such as "
                           "renewal/reminder",
    (StageDef, "id"): "a stage id is lower-case letters, digits and '_', starting with a letter",
}
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _choices(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _message(err: ErrorDetails, at: _Located) -> str:
    """A marketer-readable message for one pydantic error."""
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    loc = err["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = list(at.owner.model_fields) if at.owner is not None else []
        close = _suggest(key, known)
        hint = f" (did you mean '{close}'?)" if close else \
            (f" (expected one of: {', '.join(known)})" if known else "")
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    if kind in ("literal_error", "enum"):
        close = _suggest(value, _choices(str(ctx.get("expected", ""))))
        hint = f" (did you mean '{close}'?)" if close else ""
        return f"expected {ctx.get('expected')}, got {_got(value)}{hint}"
    if kind == "string_pattern_mismatch":
        rule = _PATTERNS.get((at.owner, at.field_name or "")) if at.owner else None
        if rule:
            return f"{rule}; got {_got(value)}"
        return f"{_got(value)} does not match the pattern {ctx.get('pattern')}"
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        return f"must be {words} {_got(ctx.get(name))}, got {_got(value)}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters long"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} entries, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} entries, got {ctx.get('actual_length')}"
    if kind in _NOUNS or kind == "int_from_float":
        return f"expected {_NOUNS.get(kind, 'a whole number')}, got {_got(value)}"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "assertion_error":
        return str(err["msg"]).removeprefix("Assertion failed, ")
    message = str(err["msg"])
    if "one of: " in message:  # a union chosen by key (when:): say what was there instead
        selectors = message.rsplit("one of: ", 1)[1].split(", ")
        if isinstance(value, dict) and value:
            keys = [str(k) for k in value]
            meant = [c for c in (_suggest(k, selectors) for k in keys) if c]
            hint = f" (did you mean '{meant[0]}'?)" if meant else ""
            listed = ", ".join(f"'{k}'" for k in keys)
            return f"{message}; got key{'s' if len(keys) > 1 else ''} {listed}{hint}"
        return f"{message}; got {_got(value)}"
    return message


def _union_message(site_path: YamlPath, errors: list[ErrorDetails]) -> str:
    """One message for a value that fits no branch of a union."""
    value = errors[0].get("input")
    name = next((p for p in reversed(site_path) if isinstance(p, str)), "")
    choices = [c for e in errors if e["type"] in ("enum", "literal_error")
               for c in _choices(str((e.get("ctx") or {}).get("expected", "")))]
    close = _suggest(value, choices)
    hint = f" (did you mean '{close}'?)" if close else ""
    if name in _UNION_HINTS:
        return f"expected {_UNION_HINTS[name]}, got {_got(value)}{hint}"
    nouns = [str((e.get("ctx") or {}).get("expected")) if e["type"] in ("enum", "literal_error")
             else _NOUNS.get(e["type"], e["type"]) for e in errors]
    return f"expected {' or '.join(dict.fromkeys(nouns))}, got {_got(value)}{hint}"


@dataclass(frozen=True)
class _Finding:
    """A problem at a path of the data, pointed at its key or at its value."""

    path: YamlPath
    message: str
    at_key: bool = False
    missing: str | None = None  # a missing key: shown in the field, pointed at its parent


def _validation_findings(model: type[BaseModel], data: Any,
                         exc: ValidationError) -> list[_Finding]:
    errors = exc.errors(include_url=False)
    located = [(_locate(model, data, tuple(e["loc"])), e) for e in errors]
    # A value that fails every branch of a union: pydantic reports each branch. Keep the branch
    # that got furthest (`{every: 30x}` is a bad duration, not "not one of per_cycle, ..."), or
    # say once what the union takes when no branch got anywhere.
    sites: dict[YamlPath, dict[str, list[tuple[_Located, ErrorDetails]]]] = {}
    for at, err in located:
        if at.site is not None:
            sites.setdefault(at.site[0], {}).setdefault(at.site[1], []).append((at, err))
    out: list[_Finding] = []
    done: set[YamlPath] = set()
    for at, err in located:
        branches = sites.get(at.site[0], {}) if at.site is not None else {}
        if at.site is None or len(branches) < 2:
            out.append(_finding(err, at))
            continue
        site_path = at.site[0]
        if site_path in done:
            continue
        done.add(site_path)
        real = [items for items in branches.values()
                if not all(a.path == site_path and e["type"] in _MISMATCH for a, e in items)]
        if not real:
            out.append(_Finding(site_path, _union_message(
                site_path, [e for items in branches.values() for _, e in items])))
            continue
        best = max(real, key=lambda items: max(len(a.path) for a, _ in items))
        out.extend(_finding(e, a) for a, e in best)
    return out


def _finding(err: ErrorDetails, at: _Located) -> _Finding:
    missing = str(err["loc"][-1]) if err["type"] == "missing" and err["loc"] else None
    return _Finding(at.path, _message(err, at), at_key=err["type"] == "extra_forbidden",
                    missing=missing)


def _version_findings(data: Mapping[str, Any]) -> list[_Finding]:
    # Literal[1] accepts True (True == 1); a version is a number.
    if isinstance(data.get("version"), bool):
        return [_Finding(("version",), f"expected {FORMAT_VERSION}, got {_got(data['version'])}")]
    return []


# --- one file ---------------------------------------------------------------------------------


@dataclass
class _Source:
    """A file being checked: turns findings into diagnostics at the right place."""

    shown: str
    doc: YamlDocument

    def diagnostic(self, finding: _Finding, base: YamlPath = (), trigger: str | None = None,
                   ) -> Diagnostic:
        full = (*base, *finding.path)
        line, col = self.doc.position(full) if finding.at_key else self.doc.value_position(full)
        # Inside a trigger the field is relative to it; a trigger with no id shows the full path.
        shown_path = finding.path if trigger is not None else full
        if finding.missing is not None:
            shown_path = (*shown_path, finding.missing)
        return Diagnostic(self.shown, line, col, finding.message, trigger,
                          _dotted(shown_path) or None)

    def at(self, line: int, col: int, message: str, path: YamlPath,
           trigger: str | None = None) -> Diagnostic:
        return Diagnostic(self.shown, line, col, message, trigger, _dotted(path) or None)

    def condition(self, path: YamlPath, message: str, offset: int, trigger: str | None,
                  field_path: YamlPath) -> Diagnostic:
        """A problem inside a condition's text, at its column in the file when that is known."""
        span = self.doc.values.get(path)
        if span is None:
            line, col = self.doc.value_position(path)
        elif span.single_line:
            line, col = span.line, span.col + (1 if span.quoted else 0) + offset
        else:  # a folded or block scalar: columns inside it do not map onto the file
            line, col = span.line, span.col
        return Diagnostic(self.shown, line, col, message, trigger, _dotted(field_path) or None)


def _replaced(doc: YamlDocument, path: YamlPath) -> bool:
    return any(path[:len(r)] == r for r in doc.replaced)


def _attribute_uses(text: str) -> list[tuple[str, int]]:
    """`attributes.<key>` names in a (compiled, so parseable) condition, with their offsets."""
    lead = len(text) - len(text.lstrip())
    tree = ast.parse(text.strip(), mode="eval")
    return [(n.attr, lead + n.col_offset) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "attributes"]


def _compile_conditions(src: _Source, raw: Any, path: YamlPath, trigger: str | None,
                        field_base: YamlPath, attributes: Mapping[str, str] | None,
                        ) -> tuple[list[Condition], list[Diagnostic]]:
    """Compile each condition of a list; errors point at the column inside the text."""
    compiled: list[Condition] = []
    diags: list[Diagnostic] = []
    if not isinstance(raw, list):
        return compiled, diags
    for j, text in enumerate(raw):
        if not isinstance(text, str) or _replaced(src.doc, (*path, j)):
            continue  # the shape check reports it
        where, shown = (*path, j), (*field_base, j)
        try:
            condition = compile_condition(text)
        except ConditionError as exc:
            diags.append(src.condition(where, str(exc), exc.offset, trigger, shown))
            continue
        compiled.append(condition)
        if attributes is None:
            continue
        for key, offset in _attribute_uses(text):
            if key not in attributes:
                close = _suggest(key, attributes)
                hint = f"did you mean '{close}'? " if close else ""
                declared = ", ".join(attributes) or "none"
                diags.append(src.condition(
                    where, f"attributes.{key} is not declared in config/club.yaml "
                                 f"attributes ({hint}declared: {declared})",
                    offset, trigger, shown))
    return compiled, diags


# --- config -----------------------------------------------------------------------------------


def load_config(config_dir: Path, *, known_adapters: set[str] | None = None,
                ) -> tuple[ProjectConfig | None, list[Diagnostic]]:
    """Read club.yaml, lifecycle.yaml, channels.yaml and the optional policy.yaml; None (and
    why) when any is broken."""
    diags: list[Diagnostic] = []
    parts: dict[str, BaseModel] = {}
    docs: dict[str, _Source] = {}
    models: tuple[tuple[str, type[BaseModel]], ...] = (
        ("club", ClubFile), ("lifecycle", LifecycleFile), ("channels", ChannelsFile),
        ("policy", PolicyFile))
    optional = {"policy"}
    for name, model in models:
        path = Path(config_dir) / f"{name}.yaml"
        shown = _display(path)
        if not path.is_file():
            if name not in optional:
                diags.append(Diagnostic(shown, 1, 1, "missing config file"))
            continue
        try:
            doc = read_yaml(path)
        except OSError as exc:
            diags.append(Diagnostic(shown, 1, 1, f"cannot read the file: {exc.strerror}"))
            continue
        src = docs[name] = _Source(shown, doc)
        diags.extend(src.at(p.line, p.col, p.message, p.path) for p in doc.problems)
        if doc.fatal or doc.problems:
            continue
        findings = _version_findings(doc.data) if isinstance(doc.data, dict) else []
        try:
            parts[name] = model.model_validate(doc.data)
        except ValidationError as exc:
            findings.extend(_validation_findings(model, doc.data, exc))
        diags.extend(src.diagnostic(f) for f in findings)
    club = parts.get("club")
    attributes = dict(club.attributes) if isinstance(club, ClubFile) else None
    lifecycle = docs.get("lifecycle")
    if lifecycle is not None and "lifecycle" in parts:
        for i, stage in enumerate(lifecycle.doc.data["stages"]):
            at: YamlPath = ("stages", i, "conditions")
            diags.extend(_compile_conditions(lifecycle, stage.get("conditions"), at, None, at,
                                             attributes)[1])
    channels = parts.get("channels")
    if known_adapters is not None and isinstance(channels, ChannelsFile):
        src = docs["channels"]
        for name, ch in channels.channels.items():
            if ch.adapter not in known_adapters:
                where: YamlPath = ("channels", name, "adapter")
                close = _suggest(ch.adapter, known_adapters)
                hint = f"did you mean '{close}'? " if close else ""
                diags.append(src.diagnostic(_Finding(
                    where, f"unknown channel adapter '{ch.adapter}' ({hint}known: "
                           f"{', '.join(sorted(known_adapters))})")))
    policy = parts.get("policy")
    if isinstance(policy, PolicyFile) and isinstance(channels, ChannelsFile):
        src = docs["policy"]
        for name in sorted(policy.channel_names() - set(channels.channels)):
            diags.append(src.diagnostic(_Finding(
                _policy_path(policy, name), f"unknown channel '{name}' (channels.yaml has: "
                                            f"{', '.join(sorted(channels.channels))})")))
    if diags or len(parts) < len(models) - len(optional - set(docs)):
        return None, sorted(diags, key=_order)
    assert isinstance(club, ClubFile) and isinstance(channels, ChannelsFile)
    lifecycle_model = parts["lifecycle"]
    assert isinstance(lifecycle_model, LifecycleFile)
    if isinstance(policy, PolicyFile):
        return ProjectConfig(club, lifecycle_model, channels, policy), []
    return ProjectConfig(club, lifecycle_model, channels), []


def _policy_path(policy: PolicyFile, channel: str) -> YamlPath:
    """Where `channel` first appears in the policy file, for its diagnostic."""
    if channel in policy.quiet_hours:
        return ("quiet_hours", channel)
    if channel in policy.cost:
        return ("cost", channel)
    if channel in policy.consent.marketing:
        return ("consent", "marketing", channel)
    for i, cap in enumerate(policy.frequency_caps):
        if cap.channel == channel:
            return ("frequency_caps", i, "channel")
    for name, seg in policy.segments.items():
        if channel in seg.max_per_cycle:
            return ("segments", name, "max_per_cycle", channel)
        if seg.channels and channel in seg.channels:
            return ("segments", name, "channels", seg.channels.index(channel))
    return ()


# --- rules ------------------------------------------------------------------------------------


@dataclass
class _TriggerResult:
    index: int
    id: str | None
    line: int
    id_position: tuple[int, int]
    trigger: Trigger | None
    conditions: list[Condition]
    diagnostics: list[Diagnostic]


@dataclass
class _FileResult:
    shown: str
    sha256: str
    top: list[Diagnostic]  # file-level problems: no trigger of the file loads
    triggers: list[_TriggerResult]


def load_rules(rules_dir: Path, *, config: ProjectConfig, templates: TemplateStore,
               known_adapters: set[str] | None = None) -> RuleSet:
    """Every rule file under `rules_dir`; broken triggers disabled, every problem reported."""
    return _load_rules(Path(rules_dir), config, templates, known_adapters)


def _load_rules(rules_dir: Path, config: ProjectConfig | None, templates: TemplateStore | None,
                known_adapters: set[str] | None) -> RuleSet:
    """`load_rules`; without a config only what needs none is checked (shape, conditions)."""
    ruleset = RuleSet(config=config)  # type: ignore[arg-type]  # only check_project passes None
    if not rules_dir.is_dir():
        ruleset.diagnostics.append(Diagnostic(_display(rules_dir), 1, 1,
                                              "rules directory not found"))
        return ruleset
    paths = sorted({*rules_dir.rglob("*.yaml"), *rules_dir.rglob("*.yml")},
                   key=lambda p: p.relative_to(rules_dir).as_posix())
    results: list[_FileResult] = []
    for path in paths:
        if not path.is_file():
            continue
        result = _load_file(path, config, templates, known_adapters, ruleset)
        if result is not None:
            results.append(result)
    _duplicate_ids(results)
    for result in results:
        ruleset.diagnostics.extend(result.top)
        for t in result.triggers:
            ruleset.diagnostics.extend(t.diagnostics)
            problems = [*result.top, *t.diagnostics]
            if problems or t.trigger is None:
                if t.id is not None:
                    ruleset.broken.setdefault(t.id, []).extend(problems)
                continue
            ruleset.triggers.append(LoadedTrigger(t.trigger, t.conditions, result.shown, t.line,
                                                  result.sha256))
    ruleset.diagnostics.sort(key=_order)
    for diags in ruleset.broken.values():
        diags.sort(key=_order)
    return ruleset


def _load_file(path: Path, config: ProjectConfig | None, templates: TemplateStore | None,
               known_adapters: set[str] | None, ruleset: RuleSet) -> _FileResult | None:
    shown = _display(path)
    try:
        doc = read_yaml(path)
    except OSError as exc:
        ruleset.diagnostics.append(Diagnostic(shown, 1, 1, f"cannot read the file: "
                                                           f"{exc.strerror}"))
        return None
    if doc.sha256 and not (doc.fatal and not doc.text):
        ruleset.files[shown] = RuleFileSource(doc.sha256, doc.text)
    src = _Source(shown, doc)
    result = _FileResult(shown, doc.sha256, [], [])
    if doc.fatal:
        result.top.extend(src.at(p.line, p.col, p.message, ()) for p in doc.problems)
        return result
    data = doc.data
    if not isinstance(data, dict):
        what = "the file is empty" if data is None else f"got {_got(data)}"
        result.top.append(src.at(1, 1, f"expected a mapping with version: {FORMAT_VERSION} and "
                                       f"triggers: [...]; {what}", ()))
        return result
    items = data.get("triggers")
    count = len(items) if isinstance(items, list) else 0
    # Problems inside one trigger disable that trigger; any other problem, the whole file.
    by_trigger: dict[int, list[tuple[int, int, str, YamlPath]]] = {}
    for p in doc.problems:
        if len(p.path) >= 2 and p.path[0] == "triggers" and isinstance(p.path[1], int) and \
                p.path[1] < count:
            by_trigger.setdefault(p.path[1], []).append((p.line, p.col, p.message, p.path[2:]))
        else:
            result.top.append(src.at(p.line, p.col, p.message, p.path))
    header = {k: v for k, v in data.items() if k != "triggers"}
    header["triggers"] = [] if isinstance(items, list) else items
    if "triggers" not in data:
        del header["triggers"]
    findings = _version_findings(data)
    try:
        RuleFile.model_validate(header)
    except ValidationError as exc:
        findings.extend(_validation_findings(RuleFile, header, exc))
    limit = _max_len(RuleFile, "triggers")
    if limit is not None and count > limit:
        findings.append(_Finding(("triggers",), f"takes at most {limit} triggers in one file, "
                                                f"got {count}; split the file"))
    result.top.extend(src.diagnostic(f) for f in findings if not _replaced(doc, f.path))
    if "version" in data and data["version"] != FORMAT_VERSION:
        # Another format version: its triggers are not checked against this one's rules.
        for i, item in enumerate(items if isinstance(items, list) else []):
            tid = _raw_id(item)
            position = doc.position(("triggers", i))
            result.triggers.append(_TriggerResult(i, tid, position[0], position, None, [], []))
        return result
    for i, item in enumerate(items if isinstance(items, list) else []):
        result.triggers.append(_check_trigger(src, i, item, by_trigger.get(i, []), config,
                                              templates, known_adapters))
    return result


def _max_len(model: type[BaseModel], name: str) -> int | None:
    return next((m.max_length for m in model.model_fields[name].metadata
                 if isinstance(m, MaxLen)), None)


def _raw_id(item: Any) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"].strip():
        return str(item["id"]).strip()
    return None


def _check_trigger(src: _Source, index: int, item: Any,
                   problems: list[tuple[int, int, str, YamlPath]], config: ProjectConfig | None,
                   templates: TemplateStore | None,
                   known_adapters: set[str] | None) -> _TriggerResult:
    """Shape, conditions and meaning of one trigger; every problem, each at its place."""
    base: YamlPath = ("triggers", index)
    doc = src.doc
    tid = _raw_id(item)
    line, _ = doc.position(base)
    id_position = doc.position((*base, "id"))
    diags = [Diagnostic(src.shown, p_line, p_col, message, tid,
                        _dotted(path if tid is not None else (*base, *path)) or None)
             for p_line, p_col, message, path in problems]
    trigger: Trigger | None = None
    shape_errors: set[YamlPath] = set()
    try:
        trigger = Trigger.model_validate(item)
    except ValidationError as exc:
        for finding in _validation_findings(Trigger, item, exc):
            if _replaced(doc, (*base, *finding.path)):
                continue  # the YAML problem there already says it
            shape_errors.add(finding.path)
            diags.append(src.diagnostic(finding, base, tid))
    conditions: list[Condition] = []
    if isinstance(item, dict):
        attributes = dict(config.club.attributes) if config is not None else None
        conditions, found = _compile_conditions(src, item.get("conditions"),
                                                (*base, "conditions"), tid,
                                                ("conditions",) if tid is not None
                                                else (*base, "conditions"), attributes)
        diags.extend(found)
        if config is not None and templates is not None:
            diags.extend(src.diagnostic(f, base, tid) for f in _meaning(
                item, shape_errors, config, templates, known_adapters))
    return _TriggerResult(index, tid, line, id_position, trigger, conditions, diags)


def _text(value: Any) -> str | None:
    # The models strip whitespace; check the value they will hold.
    return value.strip() if isinstance(value, str) and value.strip() else None


def _meaning(item: dict[str, Any], shape_errors: set[YamlPath], config: ProjectConfig,
             templates: TemplateStore, known_adapters: set[str] | None) -> list[_Finding]:
    """Checks against the config and the templates, on the raw trigger mapping so they run
    even when its shape is broken; values whose shape is wrong are left to the shape check."""
    out: list[_Finding] = []
    stages = list(config.stages)
    channels = list(config.channels.channels)

    def report(path: YamlPath, message: str) -> None:
        if path not in shape_errors:
            out.append(_Finding(path, message))

    stage = item.get("stage")
    entries = list(enumerate(stage)) if isinstance(stage, list) else [(None, stage)]
    for j, value in entries:
        name = _text(value)
        if name is not None and name not in stages:
            report(("stage",) if j is None else ("stage", j), _unknown("stage", name, stages))
    when = item.get("when")
    entered = _text(when.get("stage_entered")) if isinstance(when, dict) else None
    if entered is not None and entered not in stages:
        report(("when", "stage_entered"), _unknown("stage", entered, stages))

    raw_action = item.get("action")
    action: dict[str, Any] = raw_action if isinstance(raw_action, dict) else {}
    raw_fallback = action.get("fallback")
    fallback = list(enumerate(raw_fallback)) if isinstance(raw_fallback, list) else []
    used: list[tuple[YamlPath, str]] = []  # every channel named, with where
    if (channel := _text(action.get("channel"))) is not None:
        used.append((("action", "channel"), channel))
    used.extend((("action", "fallback", j), c) for j, c in fallback if _text(c) is not None)
    raw_variants = item.get("variants")
    variants: dict[str, Any] = raw_variants if isinstance(raw_variants, dict) else {}
    for name, variant in variants.items():
        if isinstance(variant, dict) and _text(variant.get("channel")) is not None:
            used.append((("variants", name, "channel"), str(_text(variant["channel"]))))
    for where, name in used:
        name = name.strip()
        if name not in channels:
            report(where, _unknown("channel", name, channels))
        elif known_adapters is not None and \
                (adapter := config.channels.channels[name].adapter) not in known_adapters:
            report(where, f"channel '{name}' uses adapter '{adapter}', which is not installed "
                          f"(installed: {', '.join(sorted(known_adapters))})")

    # Each template on each channel it may go out on: the (variant's) channel, then fallbacks.
    fallbacks = [c for _, c in fallback if _text(c) in channels]
    template = _text(action.get("template"))
    arms: list[tuple[YamlPath, str | None, str | None]] = [
        (("action", "template"), template, channel)]
    for name, variant in variants.items():
        if not isinstance(variant, dict):
            continue
        v_template, v_channel = _text(variant.get("template")), _text(variant.get("channel"))
        if v_template is not None:
            arms.append((("variants", name, "template"), v_template, v_channel or channel))
        elif v_channel is not None:
            arms.append((("variants", name, "channel"), template, v_channel))
    checked: set[tuple[str, str]] = set()
    said: set[str] = set()
    attributes = list(config.club.attributes)
    for where, name, first in arms:
        if name is None or where in shape_errors or ("action", "template") in shape_errors:
            continue
        for ch in dict.fromkeys(c.strip() for c in [first or "", *fallbacks]):
            if ch not in channels:
                continue
            served_by = templates.filename(name, ch) or f"{name} on {ch}"
            if (name, served_by) in checked:
                continue  # the same file, already checked
            checked.add((name, served_by))
            for problem in templates.check(name, ch, attributes):
                if problem not in said:
                    said.add(problem)
                    report(where, problem)
    return out


def _duplicate_ids(results: list[_FileResult]) -> None:
    """A trigger id defined twice: both are disabled, each naming the other's place."""
    seen: dict[str, list[tuple[_FileResult, _TriggerResult]]] = {}
    for result in results:
        for t in result.triggers:
            if t.id is not None:
                seen.setdefault(t.id, []).append((result, t))
    for tid, places in seen.items():
        if len(places) < 2:
            continue

        def where(place: tuple[_FileResult, _TriggerResult]) -> str:
            return f"{place[0].shown}:{place[1].id_position[0]}:{place[1].id_position[1]}"

        first = places[0]
        others = ", ".join(where(p) for p in places[1:])
        for place in places:
            note = f"also defined at {others}" if place is first else \
                f"first defined at {where(first)}"
            line, col = place[1].id_position
            place[1].diagnostics.append(Diagnostic(place[0].shown, line, col,
                                                   f"duplicate trigger id '{tid}' ({note})",
                                                   tid, "id"))


# --- the whole project -------------------------------------------------------------------------


def check_project(rules_dir: Path, templates_dir: Path, config_dir: Path,
                  known_adapters: set[str] | None = None,
                  ) -> tuple[RuleSet | None, list[Diagnostic]]:
    """Config, then rules; every diagnostic together, config first. No rule set (None) when the
    config is broken: the rules' shape and conditions are still checked and reported."""
    config, diags = load_config(Path(config_dir), known_adapters=known_adapters)
    if config is None:
        shape_only = _load_rules(Path(rules_dir), None, None, None)
        return None, [*diags, *shape_only.diagnostics]
    ruleset = load_rules(Path(rules_dir), config=config, templates=TemplateStore(templates_dir),
                         known_adapters=known_adapters)
    return ruleset, [*diags, *ruleset.diagnostics]


# --- JSON Schema for editors -------------------------------------------------------------------

_DURATION_PATTERN = r"^\s*\d+\s*[mhdw]\s*$"
_TIME_PATTERN = r"^\s*([01]\d|2[0-3]):[0-5]\d\s*$"
_SHARE_PATTERN = r"^\s*\d{1,2}(\.\d+)?\s*%\s*$"  # 0% up to, not including, 100%


def _duration_text(value: timedelta) -> str:
    minutes = int(value.total_seconds()) // 60
    for unit, size in (("w", 7 * 24 * 60), ("d", 24 * 60), ("h", 60)):
        if minutes % size == 0 and minutes:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


class _RuleFileSchema(GenerateJsonSchema):
    """Durations and times of day as rule files write them ("30d", "10:00"), not ISO 8601."""

    def timedelta_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        return {"type": "string", "pattern": _DURATION_PATTERN, "examples": ["30d", "12h"]}

    def time_schema(self, schema: CoreSchema) -> JsonSchemaValue:
        return {"type": "string", "pattern": _TIME_PATTERN, "examples": ["10:00"]}

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return _duration_text(dft)
        if isinstance(dft, time):
            return dft.strftime("%H:%M")
        return super().encode_default(dft)


def rule_file_schema() -> dict[str, Any]:
    """JSON Schema of the rule-file format, generated from the pydantic models."""
    generated = RuleFile.model_json_schema(mode="validation", schema_generator=_RuleFileSchema)
    schema: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                              "title": "Touchpoints rule file", **generated}
    schema["title"] = "Touchpoints rule file"
    holdout = schema["$defs"]["Trigger"]["properties"]["holdout"]
    schema["$defs"]["Trigger"]["properties"]["holdout"] = {
        "title": holdout.get("title", "Holdout"), "default": holdout.get("default", 0.0),
        "description": "share of customers held out as a control group: 10% or 0.1",
        "anyOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                  {"type": "string", "pattern": _SHARE_PATTERN}]}
    # A round trip through JSON proves it is JSON (no Python-only values left in defaults).
    result: dict[str, Any] = json.loads(json.dumps(schema))
    return result
