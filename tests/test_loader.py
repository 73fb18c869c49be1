"""The rule-file loader against the corpus in testdata/rules: every good file loads clean, every
bad file gives exactly the diagnostics written in its `# expect:` lines, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.loader import check_project, rule_file_schema
from engine.yamlsource import MAX_BYTES, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path("tests/testdata/rules")
TEMPLATES = Path("tests/testdata/templates")
CONFIG = Path("config")
CASES = sorted(p.name for p in (ROOT / CORPUS).iterdir() if p.is_dir())


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # diagnostics show paths relative to the working directory


def expected(case: str) -> list[str]:
    lines = []
    for path in sorted((CORPUS / case).glob("*.yaml")):
        for text in path.read_text(encoding="utf-8").splitlines():
            if text.startswith("# expect: "):
                lines.append(f"{path}:{text.removeprefix('# expect: ')}")
    return sorted(lines)


@pytest.mark.parametrize("case", CASES)
def test_corpus(case: str) -> None:
    ruleset, diagnostics = check_project(CORPUS / case, TEMPLATES, CONFIG,
                                         known_adapters={"console"})
    assert ruleset is not None
    assert sorted(str(d) for d in diagnostics) == expected(case)
    if case.startswith("good"):
        assert ruleset.triggers and not ruleset.broken


def test_every_bad_file_states_what_it_expects() -> None:
    for path in (ROOT / CORPUS).rglob("*.bad.yaml"):
        assert "# expect: " in path.read_text(encoding="utf-8"), path


def test_broken_trigger_leaves_the_good_one_running() -> None:
    ruleset, _ = check_project(CORPUS / "one_broken_one_good", TEMPLATES, CONFIG)
    assert ruleset is not None
    assert [t.trigger.id for t in ruleset.triggers] == ["good"]
    assert list(ruleset.broken) == ["broken"]


def test_duplicate_ids_disable_both() -> None:
    ruleset, _ = check_project(CORPUS / "duplicate_id", TEMPLATES, CONFIG)
    assert ruleset is not None and ruleset.triggers == [] and list(ruleset.broken) == ["welcome"]


def test_yaml_12_meaning() -> None:
    doc = parse_yaml("at: 21:00\nword: NO\nyes_word: yes\nflag: true\nquoted: '0123'\n")
    assert doc.problems == []
    assert doc.data == {"at": "21:00", "word": "NO", "yes_word": "yes", "flag": True,
                        "quoted": "0123"}


def test_file_too_large(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n# " + "x" * MAX_BYTES + "\ntriggers: []\n")
    _, diagnostics = check_project(tmp_path, TEMPLATES, CONFIG)
    assert [d.message for d in diagnostics] == [
        f"file is {big.stat().st_size} bytes; the limit is {MAX_BYTES}"]


def test_config_errors_are_reported_with_positions(tmp_path: Path) -> None:
    for name in ("club", "channels"):
        (tmp_path / f"{name}.yaml").write_text((ROOT / CONFIG / f"{name}.yaml").read_text())
    (tmp_path / "lifecycle.yaml").write_text(
        "version: 1\nstages:\n  - id: active\n    conditions: [visits_30 > 1]\n  - id: rest\n")
    (tmp_path / "club.yaml").write_text("version: 1\ntimezone: Mars/Olympus\n")
    ruleset, diagnostics = check_project(CORPUS / "good", TEMPLATES, tmp_path)
    assert ruleset is None
    shown = {str(d).replace(str(tmp_path), "CFG") for d in diagnostics}
    assert shown == {
        "CFG/club.yaml:2:11: timezone: unknown IANA time zone 'Mars/Olympus'",
        "CFG/lifecycle.yaml:4:18: stages[0].conditions[0]: unknown name 'visits_30' "
        "(did you mean visits_30d?)",
    }


def test_unknown_adapter_lists_the_known_ones(tmp_path: Path) -> None:
    for name in ("club", "lifecycle"):
        (tmp_path / f"{name}.yaml").write_text((ROOT / CONFIG / f"{name}.yaml").read_text())
    (tmp_path / "channels.yaml").write_text(
        "version: 1\nchannels:\n  email: {adapter: carrier_pigeon, contact: email}\n")
    _, diagnostics = check_project(CORPUS / "good", TEMPLATES, tmp_path,
                                   known_adapters={"console", "smtp"})
    assert [str(d).replace(str(tmp_path), "CFG") for d in diagnostics] == [
        "CFG/channels.yaml:3:20: channels.email.adapter: unknown channel adapter "
        "'carrier_pigeon' (known: console, smtp)"]


def test_schema_describes_the_format() -> None:
    schema = rule_file_schema()
    json.dumps(schema)
    assert schema["title"] == "Touchpoints rule file"
    assert "triggers" in schema["properties"]
    trigger = schema["$defs"]["Trigger"]
    assert trigger["additionalProperties"] is False
    assert {"id", "when", "action", "once", "holdout"} <= set(trigger["properties"])
