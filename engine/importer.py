"""CSV import: the customers, memberships, visits and consents a club management system exports.

Header names are matched case-insensitively; spaces and hyphens count as underscores
(`Member ID` is `member_id`). Required columns are marked *:

    customers    member_id*, first_name, last_name, email, phone, chat_id, timezone, locale,
                 segment; every other column becomes a customer attribute (typed as declared in
                 `config/club.yaml`, text otherwise)
    memberships  contract_id*, member_id*, plan, price, start_date*, end_date*, status
                 (active, cancelled, ended or frozen; canceled, paused and expired are understood)
    visits       visit_id*, member_id*, checked_in_at* (ISO 8601; without an offset it is read in
                 the club's time zone); stored as `visit` events with external id `visit:<visit_id>`
    consents     member_id*, channel*, granted* (yes/no, true/false, 1/0, granted/withdrawn,
                 opt-in/opt-out), given_at* (ISO 8601, as checked_in_at), purpose (marketing, the
                 default, or transactional), source (default `csv`), wording_version; each row
                 is appended to the consent log (a later row for the same member and channel
                 wins, as a later form does)

What varies between exports is accepted: a UTF-8 byte order mark (or Windows-1252 text), `,`, `;`,
tab or `|` as the delimiter, dates as `YYYY-MM-DD` or `DD.MM.YYYY`, prices with a decimal comma,
blank cells for missing values. Phone numbers are normalised to E.164; numbers without a country
code are read in the club's country (from its time zone) unless `region` says otherwise.

The file is streamed in chunks, each written in one transaction. A bad row is reported with its
line number and reason (`members.csv:17: email: not a valid address`) and the good rows are kept;
a chunk the database rejects as a whole is retried row by row to isolate the bad rows. A missing
required column is reported once and nothing is imported from that file.
"""

from __future__ import annotations

import codecs
import csv
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from zoneinfo import ZoneInfo

import phonenumbers
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DataError, IntegrityError

from engine.ingest import ConsentIn, CustomerIn, EventIn, Ingestor, IngestResult, MembershipIn

if TYPE_CHECKING:
    from engine.runtime import Runtime

__all__ = [
    "COLUMNS",
    "ImportKind",
    "ImportReport",
    "LineError",
    "describe_error",
    "import_csv",
    "normalise_phone",
    "region_of_timezone",
]

CHUNK = 2_000
MAX_ERRORS = 10_000
SAMPLE_BYTES = 64 * 1024
DELIMITERS = (",", ";", "\t", "|")
VISIT_PREFIX = "visit:"


class ImportKind(StrEnum):
    """What a CSV file holds."""

    CUSTOMERS = "customers"
    MEMBERSHIPS = "memberships"
    VISITS = "visits"
    CONSENTS = "consents"


@dataclass(frozen=True)
class _Columns:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # Model field -> the CSV column it is read from, so that errors name the column.
    fields: Mapping[str, str]


COLUMNS: dict[ImportKind, _Columns] = {
    ImportKind.CUSTOMERS: _Columns(
        ("member_id",),
        ("first_name", "last_name", "email", "phone", "chat_id", "timezone", "locale", "segment"),
        {"external_id": "member_id"}),
    ImportKind.MEMBERSHIPS: _Columns(
        ("contract_id", "member_id", "start_date", "end_date"), ("plan", "price", "status"),
        {"external_id": "contract_id", "customer_external_id": "member_id",
         "starts_on": "start_date", "ends_on": "end_date"}),
    ImportKind.VISITS: _Columns(
        ("visit_id", "member_id", "checked_in_at"), (),
        {"external_id": "visit_id", "customer_external_id": "member_id",
         "occurred_at": "checked_in_at"}),
    ImportKind.CONSENTS: _Columns(
        ("member_id", "channel", "granted", "given_at"), ("purpose", "source", "wording_version"),
        {"customer_external_id": "member_id", "occurred_at": "given_at"}),
}

# Friendlier words for the pattern checks of the ingestion models, by field.
_PATTERN_MESSAGES = {
    "email": "not a valid address",
    "phone": "not an E.164 phone number such as +4915112345678",
    "status": "expected one of active, cancelled, ended, frozen",
    "kind": "expected lowercase letters, digits and _, starting with a letter",
}
_STATUS_SYNONYMS = {"canceled": "cancelled", "paused": "frozen", "expired": "ended"}
_TRUE = {"true", "yes", "y", "1"}
_FALSE = {"false", "no", "n", "0"}
_GRANTED = {**dict.fromkeys(_TRUE | {"granted", "given", "opt-in", "opt_in", "optin",
                                     "subscribed"}, True),
            **dict.fromkeys(_FALSE | {"withdrawn", "revoked", "denied", "opt-out", "opt_out",
                                      "optout", "unsubscribed"}, False)}


@dataclass(frozen=True)
class LineError:
    """One problem with one line of a file."""

    file: str
    line: int
    column: str | None
    message: str

    def __str__(self) -> str:
        column = f" {self.column}:" if self.column else ""
        return f"{self.file}:{self.line}:{column} {self.message}"


@dataclass
class ImportReport:
    """What an import read, wrote and rejected, with every error."""

    kind: ImportKind
    file: str
    read: int = 0
    written: int = 0
    rejected: int = 0
    errors: list[LineError] = field(default_factory=list)
    # Errors beyond `max_errors` are counted, not kept, so that memory stays flat.
    errors_omitted: int = 0

    @property
    def ok(self) -> bool:
        """True if every row was written."""
        return not self.errors


class _RowInvalid(Exception):
    def __init__(self, problems: list[tuple[str | None, str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def describe_error(error: ErrorDetails) -> str:
    """A pydantic error's message in the words a marketer or club operator reads."""
    loc = [part for part in error["loc"] if isinstance(part, str)]
    name = loc[-1] if loc else ""
    if error["type"] == "string_pattern_mismatch" and name in _PATTERN_MESSAGES:
        return _PATTERN_MESSAGES[name]
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


@cache
def region_of_timezone(tz: str) -> str | None:
    """The ISO country code of an IANA time zone (`Europe/Berlin` -> `DE`), from tzdata."""
    table = resources.files("tzdata").joinpath("zoneinfo", "zone.tab").read_text(encoding="utf-8")
    for line in table.splitlines():
        if line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2] == tz:
            return parts[0]
    return None


def normalise_phone(raw: str, region: str | None) -> str:
    """`raw` in E.164; numbers without a country code are read in `region`. ValueError if the
    number is not valid."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        if region is None and not raw.lstrip().startswith("+"):
            raise ValueError(f"{raw!r} has no country code (+...) and no default region is "
                             "known") from None
        raise ValueError(f"not a phone number: {raw!r}") from None
    if not phonenumbers.is_valid_number(number):
        where = f" (read in region {region})" if region and not raw.lstrip().startswith("+") else ""
        raise ValueError(f"not a valid phone number: {raw!r}{where}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _parse_date(raw: str) -> date:
    text = raw.strip()
    german = re.fullmatch(r"(\d{1,2})\.(\d{1,2})\.(\d{4})", text)
    try:
        if german:
            day, month, year = (int(g) for g in german.groups())
            return date(year, month, day)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a calendar date: {raw!r}") from None
    raise ValueError(f"expected a date as YYYY-MM-DD or DD.MM.YYYY, got {raw!r}")


def _parse_datetime(raw: str, tz: ZoneInfo) -> datetime:
    text = raw.strip()
    german = re.fullmatch(r"(\d{1,2})\.(\d{1,2})\.(\d{4})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?", text)
    try:
        if german:
            day, month, year, hour, minute = (int(g) for g in german.groups()[:5])
            moment = datetime(year, month, day, hour, minute, int(german.group(6) or 0))
        elif re.match(r"\d{4}-\d{2}-\d{2}[ T]\d", text):
            moment = datetime.fromisoformat(text)
        else:
            raise ValueError(text)
    except ValueError:
        raise ValueError("expected a date and time as ISO 8601 (2026-03-01T18:30:00+01:00) or "
                         f"DD.MM.YYYY HH:MM, got {raw!r}") from None
    return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment.astimezone(UTC)


def _moment(row: Mapping[str, str], column: str, tz: ZoneInfo,
            problems: list[tuple[str | None, str]]) -> datetime | None:
    """The date and time in `column`, or None (absent, or unreadable with the problem noted)."""
    if column not in row:
        return None
    try:
        return _parse_datetime(row[column], tz)
    except ValueError as exc:
        problems.append((column, str(exc)))
        return None


def _parse_number(raw: str) -> float:
    text = re.sub(r"[\s€$£]", "", raw)
    if "," in text and "." in text:
        # Whichever separator comes last is the decimal one: 1.234,56 and 1,234.56.
        thousands = "." if text.rfind(",") > text.rfind(".") else ","
        text = text.replace(thousands, "").replace(",", ".")
    else:
        text = text.replace(",", ".")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def _attribute(raw: str, kind: str) -> str | int | float | bool:
    if kind == "number":
        value = _parse_number(raw)
        return int(value) if value.is_integer() else value
    if kind == "bool":
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(f"expected yes/no, true/false or 1/0, got {raw!r}")
    return raw.strip()


def _normalise_header(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lstrip("\ufeff").strip().lower())


@dataclass(frozen=True)
class _Context:
    kind: ImportKind
    columns: list[str]
    tz: ZoneInfo
    region: str | None
    attribute_types: Mapping[str, str]
    channels: Collection[str] | None = None  # consent channels known to the config


def _convert(ctx: _Context, cells: Sequence[str]) -> BaseModel:
    """One CSV row as the ingestion model; _RowInvalid lists every problem of the row."""
    if len(cells) > len(ctx.columns):
        raise _RowInvalid([(None, f"{len(cells)} fields, but the header has "
                                  f"{len(ctx.columns)} (a delimiter inside an unquoted value?)")])
    # Blank cells are missing values; short rows (trailing blanks trimmed) are padded.
    row = {name: cell.strip() for name, cell in zip(ctx.columns, cells, strict=False)
           if name and cell.strip()}
    spec = COLUMNS[ctx.kind]
    problems: list[tuple[str | None, str]] = [
        (name, "required") for name in spec.required if name not in row]
    data: dict[str, Any] = {}
    if ctx.kind is ImportKind.CUSTOMERS:
        data = {"external_id": row.get("member_id"),
                **{name: row[name] for name in spec.optional if name in row}}
        if "phone" in row:
            try:
                data["phone"] = normalise_phone(row["phone"], ctx.region)
            except ValueError as exc:
                problems.append(("phone", str(exc)))
        attributes: dict[str, Any] = {}
        known = {*spec.required, *spec.optional}
        for name, raw in row.items():
            if name in known:
                continue
            try:
                attributes[name] = _attribute(raw, ctx.attribute_types.get(name, "text"))
            except ValueError as exc:
                problems.append((name, str(exc)))
        data["attributes"] = attributes
        model: type[BaseModel] = CustomerIn
    elif ctx.kind is ImportKind.MEMBERSHIPS:
        data = {"external_id": row.get("contract_id"),
                "customer_external_id": row.get("member_id"), "plan": row.get("plan")}
        parsers: dict[str, tuple[str, Callable[[str], Any]]] = {
            "start_date": ("starts_on", _parse_date), "end_date": ("ends_on", _parse_date),
            "price": ("price", _parse_number)}
        for column, (target, parse) in parsers.items():
            if column in row:
                try:
                    data[target] = parse(row[column])
                except ValueError as exc:
                    problems.append((column, str(exc)))
        if "status" in row:
            status = row["status"].lower()
            data["status"] = _STATUS_SYNONYMS.get(status, status)
        model = MembershipIn
    elif ctx.kind is ImportKind.CONSENTS:
        data = {"customer_external_id": row.get("member_id"), "channel": row.get("channel"),
                "purpose": row.get("purpose", "marketing").lower(),
                "source": row.get("source", "csv"),
                "wording_version": row.get("wording_version")}
        if "channel" in row and ctx.channels is not None and row["channel"] not in ctx.channels:
            problems.append(("channel", f"unknown channel {row['channel']!r} (known: "
                                        f"{', '.join(sorted(ctx.channels))})"))
        if "granted" in row:
            granted = _GRANTED.get(row["granted"].lower())
            if granted is None:
                problems.append(("granted", "expected yes or no (also true/false, 1/0, "
                                            "granted/withdrawn, opt-in/opt-out)"))
            data["granted"] = granted
        data["occurred_at"] = _moment(row, "given_at", ctx.tz, problems)
        model = ConsentIn
    else:
        visit_id = row.get("visit_id")
        data = {"external_id": None if visit_id is None else VISIT_PREFIX + visit_id,
                "customer_external_id": row.get("member_id"), "kind": "visit"}
        data["occurred_at"] = _moment(row, "checked_in_at", ctx.tz, problems)
        model = EventIn
    if not problems:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = [(_column(ctx.kind, err), describe_error(err)) for err in exc.errors()]
    # In the order of the file's columns.
    order = {name: i for i, name in enumerate(ctx.columns)}
    raise _RowInvalid(sorted(problems, key=lambda p: order.get(p[0] or "", -1)))


def _column(kind: ImportKind, error: ErrorDetails) -> str | None:
    loc = error["loc"]
    if not loc:
        return None
    if loc[0] == "attributes" and len(loc) > 1:
        return str(loc[1])
    name = str(loc[0])
    return COLUMNS[kind].fields.get(name, name)


def _sniff_encoding(path: Path) -> str:
    with path.open("rb") as fh:
        sample = fh.read(SAMPLE_BYTES)
    try:
        # Incremental, so that a character cut at the end of the sample is not an error.
        codecs.getincrementaldecoder("utf-8-sig")().decode(sample, final=False)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8-sig"


def _delimiter(header_line: str) -> str:
    # Header names never contain a delimiter, so the most frequent candidate in the header is it;
    # this is steadier than csv.Sniffer, which guesses from data rows full of commas and dots.
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


@contextmanager
def _open(path: Path) -> Iterator[tuple[TextIO, str]]:
    encoding = _sniff_encoding(path)
    with path.open(encoding=encoding, newline="") as fh:
        first = fh.readline()
        fh.seek(0)
        yield fh, _delimiter(first)


class _Importer:
    def __init__(self, ingestor: Ingestor, ctx: _Context, report: ImportReport,
                 max_errors: int) -> None:
        self.ingestor = ingestor
        self.ctx = ctx
        self.report = report
        self.max_errors = max_errors

    def error(self, line: int, column: str | None, message: str) -> None:
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(LineError(self.report.file, line, column, message))
        else:
            self.report.errors_omitted += 1

    def flush(self, chunk: list[tuple[int, BaseModel]]) -> None:
        """Write a chunk in one transaction; if the database rejects it, row by row."""
        if not chunk:
            return
        try:
            self._write(chunk)
        except (IntegrityError, DataError):
            # Only errors about the rows' content: a lost connection or a locked database is not
            # the rows' fault and must stop the import, not reject every row.
            for item in chunk:
                try:
                    self._write([item])
                except (IntegrityError, DataError) as exc:
                    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                    self.error(item[0], None, f"the database rejected the row: {reason}")
                    self.report.rejected += 1

    def _write(self, chunk: list[tuple[int, BaseModel]]) -> None:
        # A key repeated within one upsert fails on PostgreSQL; the later row wins, as it does
        # across chunks, so the earlier ones are superseded rather than sent.
        positions = list(range(len(chunk)))
        if self.ctx.kind in (ImportKind.CUSTOMERS, ImportKind.MEMBERSHIPS):
            latest = {getattr(record, "external_id", p): p for p, (_, record) in enumerate(chunk)}
            positions = sorted(latest.values())
        records = [chunk[p][1] for p in positions]
        result = self._ingest(records)
        if result.errors:
            # Unknown customers: nothing of the call was written; report those, write the rest.
            bad = {positions[e.index] for e in result.errors}
            for e in result.errors:
                self.error(chunk[positions[e.index]][0], "member_id", e.message)
            self.report.rejected += len(bad)
            rest = [item for p, item in enumerate(chunk) if p not in bad]
            if rest and len(rest) < len(chunk):
                self._write(rest)
            return
        self.report.written += len(chunk)

    def _ingest(self, records: list[BaseModel]) -> IngestResult:
        if self.ctx.kind is ImportKind.CUSTOMERS:
            return self.ingestor.customers([r for r in records if isinstance(r, CustomerIn)])
        if self.ctx.kind is ImportKind.MEMBERSHIPS:
            return self.ingestor.memberships([r for r in records if isinstance(r, MembershipIn)])
        if self.ctx.kind is ImportKind.CONSENTS:
            return self.ingestor.consents([r for r in records if isinstance(r, ConsentIn)])
        return self.ingestor.events([r for r in records if isinstance(r, EventIn)])


def import_csv(target: Runtime | Ingestor, kind: ImportKind | str, path: str | os.PathLike[str],
               *, progress: Callable[[int], None] | None = None, timezone: str | None = None,
               region: str | None = None, chunk_size: int = CHUNK,
               max_errors: int = MAX_ERRORS) -> ImportReport:
    """Import one CSV file of `kind` (customers, memberships, visits, consents); see the module
    docstring.

    `timezone` (for visit times without an offset) and `region` (for phone numbers without a
    country code) default to the club's from the runtime's config; with a bare Ingestor, to UTC
    and the time zone's country. `progress` is called with the number of rows processed so far.
    At most `max_errors` errors are kept in the report; the rest are counted in `errors_omitted`.
    """
    try:
        kind = ImportKind(kind)
    except ValueError:
        raise LookupError(f"unknown import kind {kind!r}; known: "
                          f"{', '.join(k.value for k in ImportKind)}") from None
    channels: Collection[str] | None = None
    if isinstance(target, Ingestor):
        ingestor, attribute_types = target, {}
        tz = timezone or "UTC"
    else:
        ingestor, attribute_types = target.ingestor, dict(target.config.club.attributes)
        tz = timezone or target.config.club.timezone
        channels = target.config.channels.channels
    path = Path(path)
    report = ImportReport(kind, path.name)
    spec = COLUMNS[kind]
    with _open(path) as (fh, delimiter):
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            report.errors.append(LineError(path.name, 1, None, "empty file: expected a header "
                                           f"line with {', '.join(spec.required)}"))
            return report
        columns = [_normalise_header(h) for h in header]
        missing = [name for name in spec.required if name not in columns]
        repeated = sorted({c for c in columns if c and columns.count(c) > 1})
        if missing or repeated:
            problem = (f"missing required column(s) {', '.join(missing)}" if missing
                       else f"repeated column(s) {', '.join(repeated)}")
            found = ", ".join(c for c in columns if c) or "none"
            report.errors.append(LineError(
                path.name, 1, None, f"{problem} (found: {found}; delimiter {delimiter!r}); "
                "nothing was imported from this file"))
            report.read = report.rejected = sum(1 for cells in reader
                                                if any(c.strip() for c in cells))
            if progress is not None:
                progress(report.read)
            return report
        ctx = _Context(kind, columns, ZoneInfo(tz), region or region_of_timezone(tz),
                       attribute_types, channels)
        importer = _Importer(ingestor, ctx, report, max_errors)
        chunk: list[tuple[int, BaseModel]] = []
        last = reader.line_num
        try:
            for cells in reader:
                line, last = last + 1, reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                report.read += 1
                try:
                    chunk.append((line, _convert(ctx, cells)))
                except _RowInvalid as exc:
                    report.rejected += 1
                    for column, message in exc.problems:
                        importer.error(line, column, message)
                if len(chunk) >= chunk_size:
                    importer.flush(chunk)
                    chunk = []
                    if progress is not None:
                        progress(report.read)
        except UnicodeDecodeError:
            encoding = "UTF-8" if fh.encoding.startswith("utf") else fh.encoding
            importer.error(last + 1, None, f"not {encoding} text from here on; the rest of the "
                           "file was not read (save the export as UTF-8)")
        except csv.Error as exc:
            importer.error(reader.line_num, None, f"unreadable CSV: {exc}; the rest of the file "
                           "was not read")
        importer.flush(chunk)
    # Unknown customers are found when a chunk is written, after the rows' own errors.
    report.errors.sort(key=lambda e: e.line)
    if progress is not None:
        progress(report.read)
    return report
