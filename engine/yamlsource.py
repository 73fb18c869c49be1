"""Reading YAML for rule and config files: YAML 1.2, safe, capped, with the position of every node.

The file is read as a stream of ruamel.yaml parser events and the plain data (dict, list, str,
int, float, bool, None) is built here, so nothing is ever constructed from a tag, nesting depth
and node count are checked before anything deep is built, and no recursion can overflow.

YAML 1.2 means `at: 21:00` is the text "21:00", `NO`, `yes` and `on` are text, and only
true/false are booleans. A `%YAML 1.1` directive is refused rather than obeyed. Leading-zero
integers such as `0123` are refused: YAML 1.1 tools read them as octal, ruamel.yaml as 123, and a
marketer meant one of the two. Timestamps stay text (no rule field is a date). Mapping keys are
always text. Anchors, aliases and merge keys are refused: nothing here needs them and they hide
content.

Problems tied to one node (a duplicate key, an alias, an ambiguous number) carry that node's path,
so a caller can disable just the part of the file they belong to; problems that stop the read
(syntax, caps, encoding) are `fatal` and leave no data.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.resolver import VersionedResolver

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "Problem",
    "Span",
    "YamlDocument",
    "YamlPath",
    "parse_yaml",
    "read_yaml",
]

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 20
MAX_NODES = 50_000

YamlPath = tuple[str | int, ...]

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{name}" for name in ("str", "int", "float", "bool", "null")}
_QUOTES = ("'", '"')


@dataclass(frozen=True)
class Problem:
    """A problem found while reading, at a 1-based line and column, on the node at `path`."""

    line: int
    col: int
    message: str
    path: YamlPath = ()


@dataclass(frozen=True)
class Span:
    """Where a value starts (1-based), how a scalar was written, and the line it ends on."""

    line: int
    col: int
    style: str | None = None  # ' or " for quoted scalars, | or > for block scalars
    end_line: int = 0

    @property
    def quoted(self) -> bool:
        return self.style in _QUOTES

    @property
    def single_line(self) -> bool:
        """A one-line plain or quoted scalar: columns inside it map one to one onto the text."""
        return self.end_line == self.line and self.style not in ("|", ">")


@dataclass
class YamlDocument:
    """Plain data plus where each node came from.

    `positions` maps a path to the position of its mapping key (or of the sequence item);
    `values` maps it to the span of the value itself. The root is `()`.
    """

    data: Any
    positions: dict[YamlPath, tuple[int, int]] = field(default_factory=dict)
    values: dict[YamlPath, Span] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    text: str = ""
    sha256: str = ""
    # Paths whose value was dropped or replaced (an alias, an unsupported tag, an ambiguous
    # number): validation errors there only repeat the problem.
    replaced: set[YamlPath] = field(default_factory=set)
    fatal: bool = False

    def position(self, path: YamlPath) -> tuple[int, int]:
        """The key position of the deepest known node along `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.positions:
                return self.positions[path[:end]]
        return (1, 1)

    def value_position(self, path: YamlPath) -> tuple[int, int]:
        """Where the value at `path` starts, else the key position of the deepest known node."""
        span = self.values.get(path)
        return (span.line, span.col) if span is not None else self.position(path)


def read_yaml(path: Path, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH,
              max_nodes: int = MAX_NODES) -> YamlDocument:
    """Read one YAML file; problems are collected, not raised (OSError is the caller's)."""
    with open(path, "rb") as handle:
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        size = Path(path).stat().st_size
        return YamlDocument(None, problems=[Problem(1, 1, f"file is {size} bytes; the limit is "
                                                          f"{max_bytes}")], fatal=True)
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start]
        line = before.count(b"\n") + 1
        col = len(before.rsplit(b"\n", 1)[-1].decode("utf-8", "replace")) + 1
        return YamlDocument(None, sha256=sha, fatal=True, problems=[Problem(
            line, col, f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8")])
    doc = parse_yaml(text, max_depth=max_depth, max_nodes=max_nodes)
    doc.sha256 = sha
    return doc


def parse_yaml(text: str, *, max_depth: int = MAX_DEPTH,
               max_nodes: int = MAX_NODES) -> YamlDocument:
    """Parse YAML text into plain data with positions; never raises on bad input."""
    builder = _Builder(text, max_depth, max_nodes)
    try:
        for event in YAML(typ="safe", pure=True).parse(text):
            builder.feed(event)
    except _Fatal as exc:
        return builder.fail(exc.problem)
    except MarkedYAMLError as exc:
        return builder.fail(_syntax_problem(exc))
    except ReaderError as exc:
        line, col = _line_col(text, exc.position)
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1])
        return builder.fail(Problem(line, col, f"character U+{char:04X} is not allowed in YAML"))
    except YAMLError as exc:
        return builder.fail(Problem(1, 1, f"YAML: {str(exc).splitlines()[0]}"))
    return builder.document()


class _Fatal(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Skip:
    """The key of a mapping entry whose value is read but dropped (duplicate, merge, complex)."""


_SKIP = _Skip()


@dataclass
class _Frame:
    kind: str  # "map" or "seq"
    value: Any
    path: YamlPath
    span: Span
    drop: bool  # built only to be thrown away: positions are not recorded
    key: str | _Skip | None = None  # None while the next node is a key
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    index: int = 0


class _Builder:
    def __init__(self, text: str, max_depth: int, max_nodes: int) -> None:
        self.doc = YamlDocument(None, text=text,
                                sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.stack: list[_Frame] = []
        self.nodes = 0
        self.documents = 0
        self.resolver = VersionedResolver(version=(1, 2))

    # results ------------------------------------------------------------------------------

    def fail(self, problem: Problem) -> YamlDocument:
        return YamlDocument(None, problems=[problem], text=self.doc.text,
                            sha256=self.doc.sha256, fatal=True)

    def document(self) -> YamlDocument:
        self.doc.positions.setdefault((), (1, 1))
        return self.doc

    def problem(self, span: Span, message: str, path: YamlPath) -> None:
        self.doc.problems.append(Problem(span.line, span.col, message, path))

    # events -------------------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        if isinstance(event, DocumentStartEvent):
            self.documents += 1
            span = _span(event)
            if self.documents > 1:
                raise _Fatal(Problem(span.line, span.col, "more than one YAML document (---) in "
                                                          "the file; keep one"))
            version = getattr(event, "version", None)
            if version is not None and tuple(version) != (1, 2):
                raise _Fatal(Problem(span.line, span.col, f"the file asks for YAML "
                                     f"{'.'.join(map(str, version))}; it is read as YAML 1.2, "
                                     "remove the %YAML line"))
        elif isinstance(event, ScalarEvent | AliasEvent | MappingStartEvent | SequenceStartEvent):
            self.nodes += 1
            if self.nodes > self.max_nodes:
                span = _span(event)
                raise _Fatal(Problem(span.line, span.col, f"more than {self.max_nodes} YAML "
                                                          "nodes"))
            if isinstance(event, ScalarEvent):
                self.scalar(event)
            elif isinstance(event, AliasEvent):
                self.alias(event)
            else:
                self.start(event)
        elif isinstance(event, MappingEndEvent | SequenceEndEvent):
            frame = self.stack.pop()
            self.deliver(frame.value, frame.span, frame.path)

    def slot(self) -> tuple[YamlPath, bool, bool]:
        """The path of the node about to be read, whether it is a mapping key, and whether it
        will be dropped."""
        if not self.stack:
            return (), False, False
        top = self.stack[-1]
        if top.kind == "seq":
            return (*top.path, top.index), False, top.drop
        if top.key is None:
            return top.path, True, top.drop
        if isinstance(top.key, _Skip):
            return top.path, False, True
        return (*top.path, top.key), False, top.drop

    def scalar(self, event: ScalarEvent) -> None:
        span = _span(event)
        path, is_key, _ = self.slot()
        self.check_anchor(event, span, path)
        if is_key:
            self.key(event.value, span, merge=event.tag is None and event.implicit[0]
                     and event.value == "<<")
            return
        value, problem = self.resolve(event)
        if problem is not None:
            self.problem(span, problem, path)
            self.doc.replaced.add(path)
        self.deliver(value, span, path)

    def alias(self, event: AliasEvent) -> None:
        span = _span(event)
        path, is_key, _ = self.slot()
        self.problem(span, f"aliases (*{event.anchor}) are not supported; write the content out",
                     path)
        if is_key:
            self.key(None, span, merge=False)
            return
        self.doc.replaced.add(path)
        self.deliver(None, span, path)

    def start(self, event: MappingStartEvent | SequenceStartEvent) -> None:
        span = _span(event)
        path, is_key, drop = self.slot()
        if len(self.stack) + 1 > self.max_depth:
            raise _Fatal(Problem(span.line, span.col, f"nesting deeper than {self.max_depth} "
                                                      "levels"))
        self.check_anchor(event, span, path)
        tag = event.tag
        kind = "map" if isinstance(event, MappingStartEvent) else "seq"
        if tag is not None and tag not in ("!", f"{_CORE}{kind}"):
            self.problem(span, f"unsupported tag {_short(tag)}", path)
        if is_key:
            drop = True  # a mapping or list as a key: reported when it is delivered as one
        value: Any = {} if kind == "map" else []
        self.stack.append(_Frame(kind, value, path, span, drop))

    def check_anchor(self, event: Event, span: Span, path: YamlPath) -> None:
        anchor = getattr(event, "anchor", None)
        if anchor:
            self.problem(span, f"anchors (&{anchor}) are not supported; write the content out",
                         path)

    def key(self, text: str | None, span: Span, *, merge: bool) -> None:
        top = self.stack[-1]
        if merge:
            self.problem(span, "merge keys (<<) are not supported; write the keys out",
                         top.path)
            top.key = _SKIP
        elif text is None:
            top.key = _SKIP
        elif text in top.seen:
            line, col = top.seen[text]
            self.problem(span, f"duplicate key '{text}' (first at {line}:{col})",
                         (*top.path, text))
            top.key = _SKIP
        else:
            top.seen[text] = (span.line, span.col)
            top.key = text
            if not top.drop:
                self.doc.positions[(*top.path, text)] = (span.line, span.col)

    def deliver(self, value: Any, span: Span, path: YamlPath) -> None:
        """Put a finished node into its parent (or make it the document)."""
        if not self.stack:
            self.doc.data = value
            self.doc.positions[()] = (span.line, span.col)
            self.doc.values[()] = span
            return
        top = self.stack[-1]
        if top.kind == "seq":
            top.index += 1
            if not top.drop:
                top.value.append(value)
                self.doc.positions[path] = (span.line, span.col)
                self.doc.values[path] = span
            return
        if top.key is None:  # a finished mapping or list in key position
            self.problem(span, "a mapping key must be plain text", top.path)
            top.key = _SKIP
            return
        if not isinstance(top.key, _Skip) and not top.drop:
            top.value[top.key] = value
            self.doc.values[path] = span
        top.key = None

    # scalars ------------------------------------------------------------------------------

    def resolve(self, event: ScalarEvent) -> tuple[Any, str | None]:
        """The plain value of a scalar and a problem, if any (the text is kept then)."""
        text: str = event.value
        tag = event.tag
        if tag is None:
            if not event.implicit[0]:
                return text, None  # quoted or block: always text
            tag = str(self.resolver.resolve(ScalarNode, text, (True, False)))
        elif tag == "!":
            return text, None
        elif tag not in _SCALAR_TAGS:
            return text, f"unsupported tag {_short(tag)}"
        kind = tag.removeprefix(_CORE)
        if kind == "null":
            return None, None
        if kind == "bool":
            if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
                return text.lower() == "true", None
            return text, f"cannot read {text!r} as true or false"
        if kind == "int":
            return _integer(text)
        if kind == "float":
            return _float(text)
        return text, None  # str, and timestamps (no rule field is a date) and the like


def _integer(text: str) -> tuple[Any, str | None]:
    body = text.replace("_", "")
    sign = -1 if body.startswith("-") else 1
    digits = body.lstrip("+-")
    try:
        for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
            if digits.startswith(prefix):
                return sign * int(digits[2:], base), None
        if len(digits) > 1 and digits.startswith("0"):
            return text, f"ambiguous number {text}: quote it or drop the leading zero"
        return sign * int(digits), None
    except ValueError:
        return text, None  # e.g. a lone "_": ruamel's pattern allows it, nobody means a number


def _float(text: str) -> tuple[Any, str | None]:
    lowered = text.lower()
    if lowered in (".inf", "+.inf"):
        return math.inf, None
    if lowered == "-.inf":
        return -math.inf, None
    if lowered == ".nan":
        return math.nan, None
    try:
        return float(text.replace("_", "")), None
    except ValueError:
        return text, None


def _span(event: Event) -> Span:
    start, end = event.start_mark, event.end_mark
    style = getattr(event, "style", None)
    return Span(start.line + 1, start.column + 1, style if isinstance(style, str) else None,
                (end.line + 1) if end is not None else start.line + 1)


def _short(tag: str) -> str:
    return f"!!{tag.removeprefix(_CORE)}" if tag.startswith(_CORE) else tag


def _line_col(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _syntax_problem(exc: MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = f"YAML syntax: {exc.problem or exc.context}"
    context = exc.context_mark
    # "expected ',' or '}'" is clearer with where the unclosed thing began.
    if exc.problem and exc.context and context is not None and \
            (context.line + 1, context.column + 1) != (line, col):
        message += f" ({exc.context} that starts at {context.line + 1}:{context.column + 1})"
    return Problem(line, col, message)
