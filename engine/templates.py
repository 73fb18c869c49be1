"""Message templates: Jinja2 in a sandbox with strict undefined, checked against what a
customer has.

A template named `renewal/reminder` is the file `templates/renewal/reminder.<channel>.j2` if it
exists, else `templates/renewal/reminder.j2`. For email, a first line `Subject: ...` becomes the
subject. Templates see `customer`, `membership`, `trigger`, `variant` and `club`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateNotFound, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["RenderError", "Rendered", "TemplateStore", "CUSTOMER_FIELDS", "MEMBERSHIP_FIELDS"]

MAX_OUTPUT = 64 * 1024

CUSTOMER_FIELDS = frozenset({
    "external_id", "first_name", "last_name", "email", "phone", "chat_id", "timezone", "locale",
    "segment", "attributes", "stage", "lifetime_value", "visit_count", "last_visit_at",
})
MEMBERSHIP_FIELDS = frozenset({"external_id", "plan", "price", "starts_on", "ends_on", "status"})
TRIGGER_FIELDS = frozenset({"id", "description"})
TOP_LEVEL = frozenset({"customer", "membership", "trigger", "variant", "club"})


class RenderError(Exception):
    """A template failed to render for one message: missing value, sandbox violation, too long."""


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body: str


class TemplateStore:
    """Finds, checks and renders the templates of one directory."""

    def __init__(self, directory: Path, *, max_output: int = MAX_OUTPUT) -> None:
        from jinja2 import FileSystemLoader

        self.directory = Path(directory)
        self.max_output = max_output
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.directory)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        # (name, channel) -> file found before: the dispatcher asks once per message. Only files
        # found are remembered, so a template added later is seen; one removed fails to load.
        self._found: dict[tuple[str, str], str] = {}

    def filename(self, name: str, channel: str) -> str | None:
        """The file that serves `name` on `channel`, or None if there is none."""
        found = self._found.get((name, channel))
        if found is not None:
            return found
        if ".." in Path(name).parts:
            return None
        for candidate in (f"{name}.{channel}.j2", f"{name}.j2"):
            if (self.directory / candidate).is_file():
                self._found[name, channel] = candidate
                return candidate
        return None

    def check(self, name: str, channel: str, attributes: Iterable[str] = ()) -> list[str]:
        """Problems with using template `name` on `channel`, as messages; empty when fine."""
        filename = self.filename(name, channel)
        if filename is None:
            return [f"unknown template {name!r} for channel {channel!r} (looked for "
                    f"{name}.{channel}.j2 and {name}.j2 in {self.directory})"]
        source = (self.directory / filename).read_text(encoding="utf-8")
        try:
            tree = self.env.parse(source, filename=filename)
        except TemplateSyntaxError as exc:
            return [f"template {filename}:{exc.lineno}: {exc.message}"]
        return [f"template {filename}: {p}" for p in _unknown_variables(tree, set(attributes))]

    def render(self, name: str, channel: str, context: Mapping[str, Any]) -> Rendered:
        filename = self.filename(name, channel)
        if filename is None:
            raise RenderError(f"unknown template {name!r} for channel {channel!r}")
        try:
            text = self.env.get_template(filename).render(**context)
        except (UndefinedError, SecurityError, TemplateSyntaxError, TemplateNotFound) as exc:
            raise RenderError(f"{filename}: {exc}") from None
        if len(text) > self.max_output:
            raise RenderError(f"{filename}: output of {len(text)} characters exceeds "
                              f"{self.max_output}")
        subject = None
        first, _, rest = text.partition("\n")
        if first.lower().startswith("subject:"):
            subject, text = first[len("subject:"):].strip(), rest.lstrip("\n")
        return Rendered(subject, text.strip() + "\n")


def _unknown_variables(tree: nodes.Template, attributes: set[str]) -> list[str]:
    problems: list[str] = []
    assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name not in TOP_LEVEL and name.name not in assigned:
            problems.append(f"line {name.lineno}: unknown variable {name.name!r} "
                            f"(templates see {', '.join(sorted(TOP_LEVEL))})")
    allowed = {"customer": CUSTOMER_FIELDS, "membership": MEMBERSHIP_FIELDS,
               "trigger": TRIGGER_FIELDS}
    for attr in tree.find_all(nodes.Getattr):
        base = attr.node
        if isinstance(base, nodes.Name) and base.name in allowed:
            if attr.attr not in allowed[base.name]:
                problems.append(f"line {attr.lineno}: {base.name} has no field {attr.attr!r}")
        elif (isinstance(base, nodes.Getattr) and base.attr == "attributes"
              and isinstance(base.node, nodes.Name) and base.node.name == "customer"
              and attr.attr not in attributes):
            problems.append(f"line {attr.lineno}: customer attribute {attr.attr!r} is not declared "
                            "in config/club.yaml attributes")
    return problems
