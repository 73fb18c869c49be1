"""Reading YAML for rule and config files: YAML 1.2, safe, capped, with the position of every node.

ruamel.yaml in YAML 1.2 mode reads `at: 21:00` as the text "21:00" and `NO` as the text "NO".
Leading-zero integers such as `0123` are rejected (YAML 1.1 tools read them as octal), as are
anchors, aliases and merge keys (nothing in a rule file needs them, and they hide content).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "Problem", "YamlDocument", "read_yaml"]

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 20
MAX_NODES = 50_000

Path_ = tuple[str | int, ...]
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")


@dataclass(frozen=True)
class Problem:
    """A problem found while reading, at a 1-based line and column."""

    line: int
    col: int
    message: str


@dataclass
class YamlDocument:
    """Plain data plus where each node came from."""

    data: Any
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    quoted: set[Path_] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    text: str = ""
    # A fatal problem leaves no data; other problems belong to the node they point at.
    fatal: bool = False

    def position(self, path: Path_) -> tuple[int, int]:
        """The position of the deepest known node along `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.positions:
                return self.positions[path[:end]]
        return (1, 1)


def read_yaml(path: Path) -> YamlDocument:
    """Read one YAML file; problems (syntax, caps, ambiguous scalars) are collected, not raised."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        return YamlDocument(None, problems=[Problem(1, 1, f"file is {size} bytes; the limit "
                                                      f"is {MAX_BYTES}")], fatal=True)
    text = path.read_text(encoding="utf-8")
    return parse_yaml(text)


def parse_yaml(text: str) -> YamlDocument:
    yaml = YAML(typ="rt", pure=True)
    yaml.version = (1, 2)
    yaml.allow_duplicate_keys = False
    doc = YamlDocument(None, text=text)
    try:
        node = yaml.compose(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.problems.append(Problem(line, col, f"YAML syntax: {exc.problem or exc.context}"))
        doc.fatal = True
        return doc
    except YAMLError as exc:
        doc.problems.append(Problem(1, 1, f"YAML syntax: {exc}"))
        doc.fatal = True
        return doc
    if node is None:
        return doc
    counter = [0]
    seen: set[int] = set()
    if not _check_nodes(node, doc, 1, counter, seen):
        doc.fatal = True
        return doc
    try:
        data = yaml.load(text)
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.problems.append(Problem(line, col, f"duplicate key: {exc.problem}"))
        doc.fatal = True
        return doc
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.problems.append(Problem(line, col, f"YAML: {exc.problem}"))
        doc.fatal = True
        return doc
    doc.data = _plain(data, (), doc)
    doc.positions.setdefault((), (1, 1))
    return doc


def _check_nodes(node: Node, doc: YamlDocument, depth: int, counter: list[int],
                 seen: set[int]) -> bool:
    """Depth, size, aliases, merge keys and ambiguous scalars, on the composed node tree."""
    counter[0] += 1
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if counter[0] > MAX_NODES:
        doc.problems.append(Problem(line, col, f"more than {MAX_NODES} YAML nodes"))
        return False
    if depth > MAX_DEPTH:
        doc.problems.append(Problem(line, col, f"nesting deeper than {MAX_DEPTH} levels"))
        return False
    if id(node) in seen or getattr(node, "anchor", None):
        if not any(p.message.startswith("anchors") for p in doc.problems):
            doc.problems.append(Problem(line, col, "anchors and aliases are not allowed; write "
                                                   "the content out"))
        return False
    seen.add(id(node))
    if isinstance(node, ScalarNode):
        if node.style is None and _LEADING_ZERO.match(node.value):
            doc.problems.append(Problem(line, col, f"ambiguous number {node.value}: quote it or "
                                                   "drop the leading zero"))
        return True
    ok = True
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == "<<" and str(key.tag).endswith("merge"):
                doc.problems.append(Problem(key.start_mark.line + 1, key.start_mark.column + 1,
                                            "merge keys (<<) are not allowed"))
                return False
            ok = _check_nodes(key, doc, depth + 1, counter, seen) and ok
            ok = _check_nodes(value, doc, depth + 1, counter, seen) and ok
    elif isinstance(node, SequenceNode):
        for item in node.value:
            ok = _check_nodes(item, doc, depth + 1, counter, seen) and ok
    return ok


def _plain(value: Any, path: Path_, doc: YamlDocument) -> Any:
    if isinstance(value, CommentedMap):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            sub = (*path, str(key))
            kl, kc = value.lc.key(key)
            vl, vc = value.lc.value(key)
            doc.positions[sub] = (kl + 1, kc + 1)
            doc.positions[(*sub, "<value>")] = (vl + 1, vc + 1)
            out[str(key) if not isinstance(key, int | bool) else key] = _plain(item, sub, doc)
        return out
    if isinstance(value, CommentedSeq):
        items = []
        for i, item in enumerate(value):
            line, col = value.lc.item(i)
            doc.positions[(*path, i)] = (line + 1, col + 1)
            items.append(_plain(item, (*path, i), doc))
        return items
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value
