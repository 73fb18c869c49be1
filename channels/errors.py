"""Provider errors as results: the classes live in data (`config/provider_errors.yaml`).

How an adapter turns what went wrong into a `SendResult`:

    an error answer, classified by the provider's table:
        permanent | opt_out | invalid_recipient  -> FAILED  (never retried)
        transient                                -> RETRY   (with the provider's Retry-After)
    the request never left (connection refused, DNS, connect timeout, TLS handshake)
                                                 -> RETRY   (`not_sent`)
    the request may have reached the provider (read timeout, connection lost after sending)
                                                 -> UNKNOWN (`outcome_unknown`), never RETRY

The class also goes into `SendResult.error_class` and starts `SendResult.error`, so the outbox
tells an opt-out from a bad number without parsing provider text. Error text passes through
`redact` so no credential reaches the outbox or a log.
"""

from __future__ import annotations

import logging
import re
import threading
from email.utils import parsedate_to_datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from channels.base import SendResult, SendStatus

__all__ = [
    "DEFAULT_ERRORS_FILE",
    "DescriptionRule",
    "HTTPX_NEVER_SENT",
    "ErrorClass",
    "ErrorTable",
    "ErrorTableError",
    "ProviderRules",
    "RedactingFilter",
    "classified",
    "load_error_table",
    "not_sent",
    "outcome_unknown",
    "redact",
    "redact_logger",
    "retry_after_seconds",
]

DEFAULT_ERRORS_FILE = Path(__file__).resolve().parents[1] / "config" / "provider_errors.yaml"
MAX_ERROR_TEXT = 500
_EPOCH_THRESHOLD = 1_000_000_000  # a rate-limit reset above this is an epoch time, not a delay

# httpx errors raised before any byte of a request was written: safe to send again
HTTPX_NEVER_SENT: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class ErrorClass(StrEnum):
    """What an error answer means for the message and the recipient."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    OPT_OUT = "opt_out"
    INVALID_RECIPIENT = "invalid_recipient"


class ErrorTableError(ValueError):
    """`provider_errors.yaml` is missing, not YAML, or not the expected shape."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DescriptionRule(_Strict):
    """Errors whose text contains `contains` (case-insensitive) get `error_class`."""

    contains: str = Field(min_length=1)
    error_class: ErrorClass = Field(alias="class")


_STATUS_CLASS = re.compile(r"^[1-5]xx$")


class ProviderRules(_Strict):
    """One provider's rules: codes, then descriptions, then statuses, then the default."""

    codes: dict[int, ErrorClass] = Field(default_factory=dict)
    descriptions: list[DescriptionRule] = Field(default_factory=list)
    statuses: dict[int | str, ErrorClass] = Field(default_factory=dict)
    default: ErrorClass = ErrorClass.PERMANENT

    @field_validator("statuses")
    @classmethod
    def _status_keys(cls, value: dict[int | str, ErrorClass]) -> dict[int | str, ErrorClass]:
        for key in value:
            if isinstance(key, int) and not 100 <= key <= 599:
                raise ValueError(f"status {key} is not between 100 and 599")
            if isinstance(key, str) and not _STATUS_CLASS.match(key):
                raise ValueError(f"status {key!r} is neither a number nor a class like '5xx'")
        return value

    def classify(self, *, status: int | None = None, code: int | None = None,
                 description: str | None = None) -> ErrorClass:
        """The class of one error answer."""
        if code is not None and code in self.codes:
            return self.codes[code]
        if description:
            text = description.lower()
            for rule in self.descriptions:
                if rule.contains.lower() in text:
                    return rule.error_class
        if status is not None:
            if status in self.statuses:
                return self.statuses[status]
            family = f"{status // 100}xx"
            if family in self.statuses:
                return self.statuses[family]
        return self.default


class ErrorTable(_Strict):
    """`config/provider_errors.yaml`."""

    version: Literal[1]
    providers: dict[str, ProviderRules]

    def rules(self, provider: str) -> ProviderRules:
        """The rules of `provider`; LookupError lists the known ones."""
        try:
            return self.providers[provider]
        except KeyError:
            known = ", ".join(sorted(self.providers))
            raise LookupError(f"no error rules for provider {provider!r}; known: {known}") from None


@lru_cache(maxsize=16)
def _load(path: Path, mtime_ns: int) -> ErrorTable:
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
        return ErrorTable.model_validate(raw)
    except YAMLError as exc:
        raise ErrorTableError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ErrorTableError(f"{path}: {problems}") from None


def _problem(err: ErrorDetails) -> str:
    where = ".".join(str(p) for p in err["loc"])
    got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err['input']!r})"
    return f"{where}: {err['msg']}{got}"


def load_error_table(path: Path | None = None) -> ErrorTable:
    """The error table at `path` (default: the project's `config/provider_errors.yaml`)."""
    path = (path or DEFAULT_ERRORS_FILE).resolve()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise ErrorTableError(f"{path}: cannot read: {exc.strerror}") from None
    return _load(path, mtime)


# results --------------------------------------------------------------------------------------

def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT - 3] + "..."


def classified(error_class: ErrorClass, detail: str, *,
               retry_after: float | None = None) -> SendResult:
    """The result of an error answer: RETRY when transient, otherwise FAILED."""
    transient = error_class is ErrorClass.TRANSIENT
    return SendResult(SendStatus.RETRY if transient else SendStatus.FAILED,
                      error=_clip(f"{error_class}: {detail}"),
                      retry_after=retry_after if transient else None,
                      error_class=str(error_class))


def not_sent(detail: str) -> SendResult:
    """The request never reached the provider: safe to send again."""
    return SendResult(SendStatus.RETRY, error=_clip(f"transient: not sent: {detail}"),
                      error_class=str(ErrorClass.TRANSIENT))


def outcome_unknown(detail: str) -> SendResult:
    """The request may have reached the provider: never send it again blindly."""
    return SendResult(SendStatus.UNKNOWN,
                      error=_clip(f"unknown: the request may have been delivered: {detail}"))


def retry_after_seconds(retry_after: str | None = None, reset: str | None = None, *,
                        now: float) -> float | None:
    """Seconds to wait from a `Retry-After` (seconds or HTTP date) or a rate-limit reset.

    `reset` is `X-RateLimit-Reset`: epoch seconds when large (SendGrid), else a delay.
    """
    for value, is_reset in ((retry_after, False), (reset, True)):
        if value is None or not value.strip():
            continue
        try:
            number = float(value)
        except ValueError:
            if is_reset:
                continue
            try:
                number = parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError, IndexError):
                continue
            return max(0.0, number - now)
        if number >= _EPOCH_THRESHOLD:
            return max(0.0, number - now)
        return max(0.0, number)
    return None


# secrets --------------------------------------------------------------------------------------

def redact(text: str, *secrets: str | None) -> str:
    """`text` with every non-empty secret replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Rewrites log records so that text matching `pattern` becomes `replacement`."""

    def __init__(self, pattern: re.Pattern[str], replacement: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.replacement = replacement

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite `record` in place; never drops it."""
        message = record.getMessage()
        cleaned = self.pattern.sub(self.replacement, message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_installed: set[tuple[str, str]] = set()
_install_lock = threading.Lock()


def redact_logger(name: str, pattern: re.Pattern[str], replacement: str) -> None:
    """Redact `pattern` in every record the library logger `name` emits (installed once)."""
    with _install_lock:
        if (name, pattern.pattern) in _installed:
            return
        logging.getLogger(name).addFilter(RedactingFilter(pattern, replacement))
        _installed.add((name, pattern.pattern))
