"""CSV import: good rows kept, bad rows reported by line, export variations, visits, idempotence."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from engine.clock import FixedClock
from engine.importer import ImportKind, import_csv, normalise_phone, region_of_timezone
from engine.ingest import CustomerIn, Ingestor, IngestResult
from engine.models import Customer, Event, Membership
from tests.conftest import ROOT

if TYPE_CHECKING:
    from engine.runtime import Runtime

TZ = "Europe/Berlin"


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def customers(db: Engine) -> dict[str, dict[str, Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(Customer.__table__)).mappings().all()
    return {r["external_id"]: dict(r) for r in rows}


def memberships(db: Engine) -> dict[str, tuple[Any, ...]]:
    with db.connect() as conn:
        rows = conn.execute(select(Membership.external_id, Customer.external_id, Membership.plan,
                                   Membership.price, Membership.starts_on, Membership.ends_on,
                                   Membership.status)
                            .join(Customer, Customer.id == Membership.customer_id)).all()
    return {r[0]: tuple(r[1:]) for r in rows}


MEMBERS = """\
member_id,first_name,last_name,email,phone,timezone,goal
m1,Ann,Lee,ann@example.com,+49 151 12345678,,strength

m2,Bob,,bob-at-example,,,
m3,"Cat
Marie",,cat@example.com,0151 12345679,Mars/Olympus,
m4,Dan,,dan@example.com,030 1234567,America/New_York,
m5,Eve,,not-an-address,12,,
"""


def test_good_rows_kept_bad_rows_reported_by_line(db: Engine, clock: FixedClock,
                                                 tmp_path: Path) -> None:
    report = import_csv(Ingestor(db, clock), "customers", write(tmp_path, "members.csv", MEMBERS),
                        timezone=TZ)
    assert [str(e) for e in report.errors] == [
        "members.csv:4: email: not a valid address",
        "members.csv:5: timezone: unknown IANA time zone 'Mars/Olympus'",
        "members.csv:8: phone: not a valid phone number: '12' (read in region DE)",
    ]
    # Line 5 starts a quoted value over two lines; the blank line 3 is no row.
    assert (report.read, report.written, report.rejected) == (5, 2, 3)
    assert not report.ok
    found = customers(db)
    assert sorted(found) == ["m1", "m4"]
    assert found["m1"]["phone"] == "+4915112345678"
    assert found["m1"]["attributes"] == {"goal": "strength"}
    assert found["m1"]["timezone"] is None and found["m1"]["last_name"] == "Lee"
    assert found["m4"]["phone"] == "+49301234567"
    assert found["m4"]["timezone"] == "America/New_York"
    assert found["m4"]["attributes"] == {}  # a blank cell is a missing value


def seed_members(db: Engine, clock: FixedClock, *ids: str) -> Ingestor:
    ingestor = Ingestor(db, clock)
    ingestor.customers([CustomerIn(external_id=i) for i in ids])
    return ingestor


def test_semicolons_bom_german_dates_and_decimal_commas(db: Engine, clock: FixedClock,
                                                        tmp_path: Path) -> None:
    ingestor = seed_members(db, clock, "m1", "m2")
    text = (
        "\ufeffContract ID;Member-ID;Plan;Price;Start Date;End Date;Status\r\n"
        "c1;m1;monthly;49,90;01.03.2026;31.03.2026;active\r\n"
        "c2;m2;annual;1.234,50;2026-01-01;2026-12-31;Canceled\r\n"
        "c3;m1;monthly;49,90;31.02.2026;31.03.2026;active\r\n"
        "c4;ghost;monthly;10;01.03.2026;31.03.2026;\r\n"
        "c5;m2;monthly;10;01.04.2026;01.03.2026;\r\n"
        "c6;m2;monthly;ten;03/01/2026;01.03.2026;gone\r\n"
        "c7;m2;;;01.01.2027;31.12.2027;\r\n"
    )
    report = import_csv(ingestor, ImportKind.MEMBERSHIPS,
                        write(tmp_path, "contracts.csv", text), timezone=TZ)
    assert [str(e) for e in report.errors] == [
        "contracts.csv:4: start_date: not a calendar date: '31.02.2026'",
        "contracts.csv:5: member_id: unknown customer 'ghost'",
        "contracts.csv:6: end_date: ends_on 2026-03-01 is before starts_on 2026-04-01",
        "contracts.csv:7: price: expected a number, got 'ten'",
        "contracts.csv:7: start_date: expected a date as YYYY-MM-DD or DD.MM.YYYY, got "
        "'03/01/2026'",
    ]
    assert (report.read, report.written, report.rejected) == (7, 3, 4)
    assert memberships(db) == {
        "c1": ("m1", "monthly", 49.9, date(2026, 3, 1), date(2026, 3, 31), "active"),
        "c2": ("m2", "annual", 1234.5, date(2026, 1, 1), date(2026, 12, 31), "cancelled"),
        "c7": ("m2", None, None, date(2027, 1, 1), date(2027, 12, 31), "active"),
    }


def test_windows_1252_export(db: Engine, clock: FixedClock, tmp_path: Path) -> None:
    text = "member_id;first_name;last_name\nm1;Jürgen;Müller\n"
    path = write(tmp_path, "members.csv", text, encoding="cp1252")
    report = import_csv(Ingestor(db, clock), "customers", path, timezone=TZ)
    assert report.ok and report.written == 1
    assert customers(db)["m1"]["last_name"] == "Müller"


@pytest.mark.parametrize(("raw", "region", "expected"), [
    ("+49 151 1234 5678", "DE", "+4915112345678"),
    ("0151/12345678", "DE", "+4915112345678"),
    ("(030) 123 4567", "DE", "+49301234567"),
    ("0044 20 7946 0958", "DE", "+442079460958"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("+1 (415) 555-2671", None, "+14155552671"),
])
def test_phone_numbers_become_e164(raw: str, region: str | None, expected: str) -> None:
    assert normalise_phone(raw, region) == expected


@pytest.mark.parametrize(("raw", "region", "message"), [
    ("0151 12345678", None, "'0151 12345678' has no country code (+...) and no default region "
                            "is known"),
    ("call me", "DE", "not a phone number: 'call me'"),
    ("+49 12", "DE", "not a valid phone number: '+49 12'"),
])
def test_bad_phone_numbers(raw: str, region: str | None, message: str) -> None:
    with pytest.raises(ValueError) as info:
        normalise_phone(raw, region)
    assert str(info.value) == message


def test_default_region_comes_from_the_club_time_zone() -> None:
    assert region_of_timezone("Europe/Berlin") == "DE"
    assert region_of_timezone("America/New_York") == "US"
    assert region_of_timezone("UTC") is None


def test_missing_required_column_imports_nothing(db: Engine, clock: FixedClock,
                                                 tmp_path: Path) -> None:
    path = write(tmp_path, "contracts.csv", "contract_id;member_id;plan;end_date\n"
                                            "c1;m1;monthly;2026-03-31\n\nc2;m1;monthly;2026-04-30\n")
    seed_members(db, clock, "m1")
    seen: list[int] = []
    report = import_csv(Ingestor(db, clock), "memberships", path, progress=seen.append)
    assert [str(e) for e in report.errors] == [
        "contracts.csv:1: missing required column(s) start_date (found: contract_id, member_id, "
        "plan, end_date; delimiter ';'); nothing was imported from this file"]
    assert (report.read, report.written, report.rejected) == (2, 0, 2)
    assert seen == [2]
    assert memberships(db) == {}


def test_empty_file(db: Engine, clock: FixedClock, tmp_path: Path) -> None:
    report = import_csv(Ingestor(db, clock), "visits", write(tmp_path, "visits.csv", ""))
    assert [str(e) for e in report.errors] == [
        "visits.csv:1: empty file: expected a header line with visit_id, member_id, checked_in_at"]


def test_unknown_kind() -> None:
    with pytest.raises(LookupError, match="known: customers, memberships, visits"):
        import_csv(None, "payments", "x.csv")  # type: ignore[arg-type]


VISITS = """\
visit_id,member_id,checked_in_at
v1,m1,2026-02-27T18:30:00+01:00
v2,m1,2026-03-01 07:15
v3,m2,01.03.2026 19:00
v4,m2,2026-03-01
v5,ghost,2026-03-01T10:00:00Z
v6,m2,2026-02-20T10:00:00Z
"""


def test_visits_update_activity_and_reimport_is_idempotent(db: Engine, clock: FixedClock,
                                                           tmp_path: Path) -> None:
    seed_members(db, clock, "m1", "m2", "m3")
    path = write(tmp_path, "visits.csv", VISITS)
    for _ in range(2):
        report = import_csv(Ingestor(db, clock), "visits", path, timezone=TZ, chunk_size=2)
        assert [str(e) for e in report.errors] == [
            "visits.csv:5: checked_in_at: expected a date and time as ISO 8601 "
            "(2026-03-01T18:30:00+01:00) or DD.MM.YYYY HH:MM, got '2026-03-01'",
            "visits.csv:6: member_id: unknown customer 'ghost'",
        ]
        assert (report.read, report.written, report.rejected) == (6, 4, 2)
        found = customers(db)
        # Local times without an offset are the club's (UTC+1 in winter).
        assert found["m1"]["last_visit_at"] == datetime(2026, 3, 1, 6, 15)
        assert found["m1"]["visit_count"] == 2
        assert found["m2"]["last_visit_at"] == datetime(2026, 3, 1, 18, 0)
        assert found["m2"]["visit_count"] == 2
        assert found["m3"]["visit_count"] == 0 and found["m3"]["last_visit_at"] is None
    with db.connect() as conn:
        ids = sorted(conn.execute(select(Event.external_id)).scalars())
    assert ids == ["visit:v1", "visit:v2", "visit:v3", "visit:v6"]


def test_customers_reimport_updates_in_place(db: Engine, clock: FixedClock,
                                             tmp_path: Path) -> None:
    ingestor = Ingestor(db, clock)
    first = write(tmp_path, "a.csv", "member_id,first_name,email\nm1,Ann,ann@example.com\n"
                                     "m2,Bob,bob@example.com\n")
    assert import_csv(ingestor, "customers", first).written == 2
    assert import_csv(ingestor, "customers", first).written == 2
    # The same member twice in one chunk (and file): the later row wins, on both databases.
    second = write(tmp_path, "b.csv", "member_id,first_name,email\nm1,Anna,anna@example.com\n"
                                      "m1,Anne,anne@example.com\n")
    report = import_csv(ingestor, "customers", second)
    assert report.ok and report.written == 2
    found = customers(db)
    assert len(found) == 2
    assert (found["m1"]["first_name"], found["m1"]["email"]) == ("Anne", "anne@example.com")


class Poisoned(Ingestor):
    """Fails any call that includes the customer `poison`, as a constraint violation would."""

    def customers(self, rows: Sequence[CustomerIn]) -> IngestResult:
        if any(r.external_id == "poison" for r in rows):
            raise IntegrityError("INSERT INTO customers ...", {}, Exception("poisoned row\nmore"))
        return super().customers(rows)


def test_chunk_rejected_by_the_database_is_retried_row_by_row(db: Engine, clock: FixedClock,
                                                              tmp_path: Path) -> None:
    rows = "".join(f"m{i}\n" for i in range(1, 8))
    path = write(tmp_path, "members.csv", "member_id\n" + rows.replace("m5", "poison"))
    seen: list[int] = []
    report = import_csv(Poisoned(db, clock), "customers", path, chunk_size=3,
                        progress=seen.append)
    assert [str(e) for e in report.errors] == [
        "members.csv:6: the database rejected the row: poisoned row"]
    assert (report.read, report.written, report.rejected) == (7, 6, 1)
    assert sorted(customers(db)) == ["m1", "m2", "m3", "m4", "m6", "m7"]
    assert seen == [3, 6, 7]


def test_extra_columns_and_short_or_long_rows(db: Engine, clock: FixedClock,
                                              tmp_path: Path) -> None:
    text = ("member_id,first_name,Referral Source,\n"
            "m1,Ann,flyer,\n"
            "m2,Bob\n"
            "m3,Cat,friend,,surplus\n")
    report = import_csv(Ingestor(db, clock), "customers", write(tmp_path, "m.csv", text))
    assert [str(e) for e in report.errors] == [
        "m.csv:4: 5 fields, but the header has 4 (a delimiter inside an unquoted value?)"]
    found = customers(db)
    assert found["m1"]["attributes"] == {"referral_source": "flyer"}
    assert found["m2"]["attributes"] == {} and found["m2"]["first_name"] == "Bob"


def test_errors_beyond_the_limit_are_counted(db: Engine, clock: FixedClock,
                                            tmp_path: Path) -> None:
    text = "member_id,email\n" + "".join(f"m{i},nope\n" for i in range(5))
    report = import_csv(Ingestor(db, clock), "customers", write(tmp_path, "m.csv", text),
                        max_errors=2)
    assert [str(e) for e in report.errors] == ["m.csv:2: email: not a valid address",
                                               "m.csv:3: email: not a valid address"]
    assert (report.rejected, report.errors_omitted) == (5, 3)


def runtime_for(db: Engine, clock: FixedClock, tmp_path: Path, config: Path) -> Runtime:
    """A runtime over `db` with the project's `config` and no triggers."""
    from engine.runtime import Runtime
    from engine.settings import Settings

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "none.yaml").write_text("version: 1\ntriggers: []\n", encoding="utf-8")
    return Runtime.load(Settings(_env_file=None, rules_dir=rules, templates_dir=tmp_path,
                                 config_dir=config), clock, engine=db)


def test_runtime_gives_club_time_zone_region_and_attribute_types(db: Engine, clock: FixedClock,
                                                                  tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    club = (config / "club.yaml").read_text(encoding="utf-8")
    (config / "club.yaml").write_text(
        club.replace("attributes:\n", "attributes:\n  weekly_target: number\n  newsletter: bool\n"),
        encoding="utf-8")
    runtime = runtime_for(db, clock, tmp_path, config)
    members = write(tmp_path, "members.csv",
                    "member_id;phone;weekly_target;newsletter;goal\n"
                    "m1;0151 12345678;2,5;yes;strength\n"
                    "m2;;3;nein;\n"
                    "m3;;;0;\n")
    report = import_csv(runtime, "customers", members)
    assert [str(e) for e in report.errors] == [
        "members.csv:3: newsletter: expected yes/no, true/false or 1/0, got 'nein'"]
    found = customers(db)
    assert found["m1"]["phone"] == "+4915112345678"  # read in Germany, the club's country
    assert found["m1"]["attributes"] == {"weekly_target": 2.5, "newsletter": True,
                                         "goal": "strength"}
    assert found["m3"]["attributes"] == {"newsletter": False}
    visits = write(tmp_path, "visits.csv", "visit_id,member_id,checked_in_at\n"
                                           "v1,m1,2026-03-01 07:15\n")
    assert import_csv(runtime, "visits", visits).ok
    assert customers(db)["m1"]["last_visit_at"] == datetime(2026, 3, 1, 6, 15)


def test_consents_appended_to_the_log_bad_rows_reported(db: Engine, clock: FixedClock,
                                                        tmp_path: Path) -> None:
    from engine.models import ConsentEntry

    runtime = runtime_for(db, clock, tmp_path, ROOT / "config")
    ingestor = runtime.ingestor
    ingestor.customers([CustomerIn(external_id="m1"), CustomerIn(external_id="m2")])
    path = write(tmp_path, "consents.csv",
                 "Member ID;Channel;Granted;Given at;Purpose;Wording version\n"
                 "m1;sms;yes;2026-02-01 10:00;;v3\n"
                 "m1;sms;opt-out;01.03.2026 09:30;marketing;\n"
                 "m2;email;withdrawn;2026-03-02T08:00:00+00:00;transactional;\n"
                 "m2;fax;yes;2026-03-02 08:00;;\n"
                 "m2;sms;maybe;2026-03-02 08:00;;\n"
                 "m9;sms;yes;2026-03-02 08:00;;\n"
                 "m2;chat;yes;;;\n")
    report = import_csv(runtime, "consents", path)
    assert [str(e) for e in report.errors] == [
        "consents.csv:5: channel: unknown channel 'fax' (known: chat, email, sms)",
        "consents.csv:6: granted: expected yes or no (also true/false, 1/0, granted/withdrawn, "
        "opt-in/opt-out)",
        "consents.csv:7: member_id: unknown customer 'm9'",
        "consents.csv:8: given_at: required"]
    assert (report.read, report.written, report.rejected) == (7, 3, 4)
    with db.connect() as conn:
        rows = conn.execute(
            select(Customer.external_id, ConsentEntry.channel, ConsentEntry.purpose,
                   ConsentEntry.granted, ConsentEntry.occurred_at, ConsentEntry.source,
                   ConsentEntry.wording_version)
            .join(Customer, Customer.id == ConsentEntry.customer_id)
            .order_by(ConsentEntry.id)).all()
    # in file order, so the later entry is the one in force; local times read in Berlin
    assert [tuple(r) for r in rows] == [
        ("m1", "sms", "marketing", True, datetime(2026, 2, 1, 9, 0), "csv", "v3"),
        ("m1", "sms", "marketing", False, datetime(2026, 3, 1, 8, 30), "csv", None),
        ("m2", "email", "transactional", False, datetime(2026, 3, 2, 8, 0), "csv", None)]
