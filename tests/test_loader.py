"""The rule-file loader against the corpus in testdata/rules: every good file loads clean, every
bad file gives exactly the diagnostics written in its `# expect:` lines, all at once.

Each directory of the corpus is one rules directory (a case); a case may hold several files, so
problems across files (duplicate ids, many errors at once) are cases too.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from engine.loader import (
    Diagnostic,
    check_project,
    load_config,
    load_rules,
    rule_file_schema,
)
from engine.templates import TemplateStore
from engine.yamlsource import MAX_BYTES, parse_yaml, read_yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path("tests/testdata/rules")
TEMPLATES = Path("tests/testdata/templates")
CONFIG = Path("config")
CASES = sorted(p.name for p in (ROOT / CORPUS).iterdir() if p.is_dir())
GOOD_FILES = sorted((ROOT / CORPUS).rglob("*.good.yaml"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # diagnostics show paths relative to the working directory


def expected(case: str) -> list[str]:
    lines = []
    for path in sorted((CORPUS / case).glob("*.yaml")):
        for text in path.read_text(encoding="utf-8").splitlines():
            if text.startswith("# expect: "):
                lines.append(f"{path.as_posix()}:{text.removeprefix('# expect: ')}")
    return sorted(lines)


# --- the corpus --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_corpus(case: str) -> None:
    ruleset, diagnostics = check_project(CORPUS / case, TEMPLATES, CONFIG,
                                         known_adapters={"console"})
    assert ruleset is not None
    assert sorted(str(d) for d in diagnostics) == expected(case)
    assert ruleset.diagnostics == diagnostics  # the config itself is clean
    for d in diagnostics:
        assert not d.path.endswith(".good.yaml"), d
    # Every trigger of a good file loads; no trigger of a bad file with problems of its own does.
    loaded = {t.path for t in ruleset.triggers}
    for good in (CORPUS / case).glob("*.good.yaml"):
        assert good.as_posix() in loaded


def test_every_bad_file_states_what_it_expects() -> None:
    for path in (ROOT / CORPUS).rglob("*.bad.yaml"):
        assert "# expect: " in path.read_text(encoding="utf-8"), path


def test_broken_trigger_leaves_the_good_one_running() -> None:
    ruleset, _ = check_project(CORPUS / "one_broken_one_good", TEMPLATES, CONFIG)
    assert ruleset is not None
    assert [t.trigger.id for t in ruleset.triggers] == ["good"]
    assert list(ruleset.broken) == ["broken"]
    assert [str(d) for d in ruleset.broken["broken"]] == expected("one_broken_one_good")


def test_duplicate_ids_disable_both() -> None:
    ruleset, diagnostics = check_project(CORPUS / "duplicate_id", TEMPLATES, CONFIG)
    assert ruleset is not None and ruleset.triggers == [] and list(ruleset.broken) == ["welcome"]
    assert ruleset.broken["welcome"] == diagnostics


def test_a_broken_top_level_disables_the_whole_file() -> None:
    ruleset, _ = check_project(CORPUS / "top_level_broken", TEMPLATES, CONFIG)
    assert ruleset is not None and ruleset.triggers == []
    assert [d.message for d in ruleset.broken["fine-but-file-broken"]] == [
        "unknown key 'owner' (expected one of: version, triggers)"]


def test_a_shape_error_in_one_file_keeps_the_others() -> None:
    ruleset, _ = check_project(CORPUS / "two_files", TEMPLATES, CONFIG)
    assert ruleset is not None
    assert [t.trigger.id for t in ruleset.triggers] == ["c"]
    assert sorted(ruleset.broken) == ["a", "b"]


def test_loaded_triggers_carry_their_file() -> None:
    ruleset, _ = check_project(CORPUS / "good", TEMPLATES, CONFIG)
    assert ruleset is not None
    path = "tests/testdata/rules/good/club.good.yaml"
    raw = (ROOT / path).read_bytes()
    assert ruleset.files[path].sha256 == hashlib.sha256(raw).hexdigest()
    assert ruleset.files[path].text == raw.decode("utf-8")
    by_id = {t.trigger.id: t for t in ruleset.triggers}
    assert [(t.path, t.line, t.sha256) for t in by_id.values()] == [
        (path, 4, ruleset.files[path].sha256), (path, 19, ruleset.files[path].sha256),
        (path, 23, ruleset.files[path].sha256)]
    late = by_id["late-evening"]
    assert [c.text for c in late.conditions] == late.trigger.conditions
    assert late.trigger.description == "NO"
    assert late.trigger.when.at.hour == 21  # type: ignore[union-attr]


def test_yaml_12_words_reach_the_model() -> None:
    ruleset, _ = check_project(CORPUS / "yaml12", TEMPLATES, CONFIG)
    assert ruleset is not None
    words = next(t.trigger for t in ruleset.triggers if t.trigger.id == "words")
    assert words.description == "NO"
    assert words.when.event == "on"  # type: ignore[union-attr]
    assert list(words.variants) == ["NO", "yes"]
    assert words.goal is not None and words.goal.event == "off"
    assert words.priority == 15


def test_file_too_large(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n# " + "x" * MAX_BYTES + "\ntriggers: []\n")
    _, diagnostics = check_project(tmp_path, TEMPLATES, CONFIG)
    assert [d.message for d in diagnostics] == [
        f"file is {big.stat().st_size} bytes; the limit is {MAX_BYTES}"]


def test_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"version: 1\ntriggers:\n  - id: caf\xe9\n")
    ruleset, diagnostics = check_project(tmp_path, TEMPLATES, CONFIG)
    assert ruleset is not None and ruleset.triggers == []
    assert [(d.line, d.col, d.message) for d in diagnostics] == [
        (3, 12, "not UTF-8 text (byte 0xe9); save the file as UTF-8")]


def test_paths_outside_the_working_directory_stay_as_given(tmp_path: Path) -> None:
    (tmp_path / "x.yml").write_text("version: 2\n")
    _, diagnostics = check_project(tmp_path, TEMPLATES, CONFIG)
    assert [str(d) for d in diagnostics] == [f"{tmp_path}/x.yml:1:10: version: expected 1, got 2"]


def test_missing_rules_directory(tmp_path: Path) -> None:
    ruleset, diagnostics = check_project(tmp_path / "nope", TEMPLATES, CONFIG)
    assert ruleset is not None and ruleset.triggers == []
    assert [d.message for d in diagnostics] == ["rules directory not found"]


def test_adapters_not_installed_disable_the_triggers_that_use_them() -> None:
    config, diagnostics = load_config(CONFIG)
    assert config is not None and diagnostics == []
    ruleset = load_rules(CORPUS / "two_files", config=config, templates=TemplateStore(TEMPLATES),
                         known_adapters={"smtp"})
    assert ruleset.triggers == []
    assert [str(d) for d in ruleset.diagnostics if "adapter" in d.message] == [
        "tests/testdata/rules/two_files/a.bad.yaml:5:23: trigger a: action.channel: channel "
        "'email' uses adapter 'console', which is not installed (installed: smtp)",
        "tests/testdata/rules/two_files/b.bad.yaml:5:23: trigger b: action.channel: channel 'sms' "
        "uses adapter 'console', which is not installed (installed: smtp)",
        "tests/testdata/rules/two_files/c.good.yaml:5:23: trigger c: action.channel: channel "
        "'chat' uses adapter 'console', which is not installed (installed: smtp)",
    ]


def test_diagnostic_format() -> None:
    assert str(Diagnostic("rules/a.yaml", 3, 5, "bad")) == "rules/a.yaml:3:5: bad"
    assert str(Diagnostic("rules/a.yaml", 3, 5, "bad", "t", "when.days")) == \
        "rules/a.yaml:3:5: trigger t: when.days: bad"
    assert str(Diagnostic("rules/a.yaml", 3, 5, "bad", "t")) == "rules/a.yaml:3:5: trigger t: bad"


# --- config ------------------------------------------------------------------------------------


def _config_dir(tmp_path: Path, **files: str) -> Path:
    for name in ("club", "lifecycle", "channels"):
        text = files.get(name) or (ROOT / CONFIG / f"{name}.yaml").read_text()
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def test_config_errors_are_reported_with_positions(tmp_path: Path) -> None:
    cfg = _config_dir(tmp_path, club="version: 1\ntimezone: Mars/Olympus\n", lifecycle=(
        "version: 1\nstages:\n  - id: active\n    conditions: [visits_30 > 1]\n  - id: rest\n"))
    ruleset, diagnostics = check_project(CORPUS / "good", TEMPLATES, cfg)
    assert ruleset is None
    assert [str(d).replace(str(tmp_path), "CFG") for d in diagnostics] == [
        "CFG/club.yaml:2:11: timezone: unknown IANA time zone 'Mars/Olympus'",
        "CFG/lifecycle.yaml:4:18: stages[0].conditions[0]: unknown name 'visits_30' "
        "(did you mean visits_30d?)",
    ]


def test_stage_condition_column_inside_a_quoted_string(tmp_path: Path) -> None:
    cfg = _config_dir(tmp_path, lifecycle=(
        "version: 1\nstages:\n  - id: active\n    conditions:\n"
        "      - \"visits_30d > 1 and attributes.shoe == 'x'\"\n  - id: rest\n"))
    config, diagnostics = load_config(cfg)
    assert config is None
    assert [(d.line, d.col, d.field, d.message) for d in diagnostics] == [
        (5, 29, "stages[0].conditions[0]", "attributes.shoe is not declared in config/club.yaml "
         "attributes (declared: goal, referral_source)")]


def test_broken_config_still_reports_the_rules_shape(tmp_path: Path) -> None:
    cfg = _config_dir(tmp_path, channels="version: 1\nchannels: {}\n")
    ruleset, diagnostics = check_project(CORPUS / "union", TEMPLATES, cfg)
    assert ruleset is None
    assert str(diagnostics[0]).replace(str(tmp_path), "CFG") == \
        "CFG/channels.yaml:2:11: channels: needs at least 1 entries, got 0"
    assert sorted(str(d) for d in diagnostics[1:]) == expected("union")


def test_missing_config_file(tmp_path: Path) -> None:
    config, diagnostics = load_config(tmp_path)
    assert config is None
    assert [d.message for d in diagnostics] == ["missing config file"] * 3


def test_unknown_adapter_lists_the_known_ones(tmp_path: Path) -> None:
    cfg = _config_dir(tmp_path, channels=(
        "version: 1\nchannels:\n  email: {adapter: carrier_pigeon, contact: email}\n"))
    _, diagnostics = check_project(CORPUS / "good", TEMPLATES, cfg,
                                   known_adapters={"console", "smtp"})
    assert [str(d).replace(str(tmp_path), "CFG") for d in diagnostics] == [
        "CFG/channels.yaml:3:20: channels.email.adapter: unknown channel adapter "
        "'carrier_pigeon' (known: console, smtp)"]


# --- reading YAML ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("21:00", "21:00"),  # YAML 1.1: 1260
    ("1:30:00", "1:30:00"),
    ("NO", "NO"), ("no", "no"), ("yes", "yes"), ("on", "on"), ("off", "off"), ("y", "y"),
    ("true", True), ("false", False), ("True", True),
    ("~", None), ("null", None), ("", None),
    ("0", 0), ("-0", 0), ("+12", 12), ("0o17", 15), ("0x1F", 31), ("1_000", 1000),
    ("0.5", 0.5), ("012.5", 12.5), ("1e3", 1000.0), (".inf", math.inf),
    ("2024-01-01", "2024-01-01"),  # no rule field is a date: timestamps stay text
    ("'0123'", "0123"), ('"yes"', "yes"), ("!!str 0123", "0123"), ("!!int '12'", 12),
])
def test_yaml_12_scalars(text: str, value: Any) -> None:
    doc = parse_yaml(f"a: {text}\n")
    assert doc.problems == []
    assert doc.data == {"a": value}
    assert type(doc.data["a"]) is type(value)


@pytest.mark.parametrize("text", ["0123", "08", "-012", "+00"])
def test_leading_zero_numbers_are_refused(text: str) -> None:
    doc = parse_yaml(f"a: {text}\n")
    assert [(p.line, p.col, p.message, p.path) for p in doc.problems] == [
        (1, 4, f"ambiguous number {text}: quote it or drop the leading zero", ("a",))]
    assert doc.data == {"a": text} and ("a",) in doc.replaced


def test_positions_of_keys_items_and_values() -> None:
    doc = parse_yaml("x:\n  - id: a\n    c: [\"q\", s]\n    d: |\n      hi\n")
    assert doc.data == {"x": [{"id": "a", "c": ["q", "s"], "d": "hi\n"}]}
    assert doc.positions[("x",)] == (1, 1)
    assert doc.positions[("x", 0)] == (2, 5)
    assert doc.positions[("x", 0, "id")] == (2, 5)
    assert doc.value_position(("x", 0, "id")) == (2, 9)
    assert doc.positions[("x", 0, "c", 1)] == (3, 14)
    assert doc.values[("x", 0, "c", 0)].quoted and doc.values[("x", 0, "c", 0)].single_line
    assert not doc.values[("x", 0, "d")].single_line
    assert doc.position(("x", 0, "nope", 3)) == (2, 5)


def test_every_duplicate_key_is_reported() -> None:
    doc = parse_yaml("a: 1\na: 2\nb: {c: 1, c: 2}\n")
    assert not doc.fatal and doc.data == {"a": 1, "b": {"c": 1}}
    assert [(p.line, p.col, p.message, p.path) for p in doc.problems] == [
        (2, 1, "duplicate key 'a' (first at 1:1)", ("a",)),
        (3, 11, "duplicate key 'c' (first at 3:5)", ("b", "c"))]


def test_anchors_aliases_merge_keys_and_tags_are_refused() -> None:
    doc = parse_yaml("a: &x 1\nb: *x\n<<: {q: 1}\nc: !!python/object:os.system x\n"
                     "? [k]\n: 1\n")
    assert doc.data == {"a": 1, "b": None, "c": "x"}
    assert [(p.line, p.col, p.message) for p in doc.problems] == [
        (1, 4, "anchors (&x) are not supported; write the content out"),
        (2, 4, "aliases (*x) are not supported; write the content out"),
        (3, 1, "merge keys (<<) are not supported; write the keys out"),
        (4, 4, "unsupported tag !!python/object:os.system"),
        (5, 3, "a mapping key must be plain text")]


@pytest.mark.parametrize(("text", "problem"), [
    ("a: " + "[" * 5000 + "]" * 5000, (1, 23, "nesting deeper than 20 levels")),
    ("a: [1\n", (2, 1, "YAML syntax: expected ',' or ']', but got '<stream end>' (while parsing "
                       "a flow sequence that starts at 1:4)")),
    ("a: b: c\n", (1, 5, "YAML syntax: mapping values are not allowed here")),
    ("a: \x07\n", (1, 4, "character U+0007 is not allowed in YAML")),
    ("%YAML 1.1\n---\na: yes\n", (2, 1, "the file asks for YAML 1.1; it is read as YAML 1.2, "
                                        "remove the %YAML line")),
])
def test_fatal_problems(text: str, problem: tuple[int, int, str]) -> None:
    doc = parse_yaml(text)
    assert doc.fatal and doc.data is None
    assert [(p.line, p.col, p.message) for p in doc.problems] == [problem]


def test_node_cap() -> None:
    doc = parse_yaml("- 1\n- 2\n- 3\n", max_nodes=3)
    assert doc.fatal and [p.message for p in doc.problems] == ["more than 3 YAML nodes"]


def test_read_yaml_size_cap_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(b"\xef\xbb\xbfa: 1\n")  # a BOM is not part of the text
    doc = read_yaml(path)
    assert doc.data == {"a": 1}
    assert doc.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_yaml(path, max_bytes=4).problems[0].message == \
        "file is 8 bytes; the limit is 4"


# --- JSON Schema -------------------------------------------------------------------------------


def test_schema_describes_the_format() -> None:
    schema = rule_file_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["title"] == "Touchpoints rule file"
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "triggers" in schema["properties"]
    trigger = schema["$defs"]["Trigger"]
    assert trigger["additionalProperties"] is False
    assert {"id", "when", "action", "once", "holdout"} <= set(trigger["properties"])
    relative = schema["$defs"]["RelativeWhen"]["properties"]["at"]
    assert relative["type"] == "string" and relative["default"] == "10:00"
    assert schema["$defs"]["EventWhen"]["properties"]["within"]["default"] == "2d"


@pytest.mark.parametrize("path", GOOD_FILES, ids=lambda p: p.parent.name)
def test_good_files_validate_against_the_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = rule_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(parse_yaml(path.read_text(encoding="utf-8")).data, schema)


@pytest.mark.parametrize("case", ["unknown_key_trigger", "holdout", "bad_time", "wrong_version"])
def test_bad_files_fail_the_schema(case: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    path = next((ROOT / CORPUS / case).glob("*.bad.yaml"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(parse_yaml(path.read_text(encoding="utf-8")).data,
                            rule_file_schema())
