"""The HTTP API, served by a real uvicorn server in a thread and called over HTTP with httpx."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine, func, select

from engine.api import NoApiKey, create_app
from engine.clock import FixedClock
from engine.db import take_lease
from engine.evaluation import TICK_LEASE
from engine.models import Customer, Event, Membership
from engine.runtime import Runtime
from engine.settings import Settings
from tests.conftest import ROOT

KEY = "test-key-0123456789"

RULES = """\
version: 1
triggers:
  - id: welcome
    description: Welcome new members
    stage: onboarding
    when: {stage_entered: onboarding}
    action: {channel: email, template: test/hello}
  - id: renewal-entry
    description: Membership ends within 30 days
    stage: renewal_due
    when: {stage_entered: renewal_due}
    action: {channel: sms, template: test/hello}
  - id: broken-template
    when: {event: visit}
    action: {channel: email, template: test/missing}
  - id: paused
    enabled: false
    when: {event: visit}
    action: {channel: email, template: test/hello}
"""

HELLO = "Subject: Hello {{ customer.first_name }}\n\nHi {{ customer.first_name }}, see you at " \
        "{{ club.name }}.\n"


@dataclasses.dataclass
class Api:
    """A served app, a client holding the key, and what is behind them."""

    client: httpx.Client
    runtime: Runtime
    clock: FixedClock
    url: str

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.client.post(path, json=body)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params=params)


@pytest.fixture
def runtime(db: Engine, clock: FixedClock, tmp_path: Path) -> Runtime:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "club.yaml").write_text(RULES, encoding="utf-8")
    templates = tmp_path / "templates" / "test"
    templates.mkdir(parents=True)
    (templates / "hello.j2").write_text(HELLO, encoding="utf-8")
    settings = Settings(_env_file=None, database_url="sqlite://", api_key=KEY,
                        rules_dir=rules, templates_dir=tmp_path / "templates",
                        config_dir=ROOT / "config", console_outbox_path=tmp_path / "outbox.jsonl")
    return Runtime.load(settings, clock, engine=db)


@pytest.fixture
def served(runtime: Runtime) -> Iterator[str]:
    """The API on 127.0.0.1 at a free port, for the duration of the test."""
    with serve(create_app(runtime)) as url:
        yield url


def serve_thread(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    return server, thread, sock


class serve:  # noqa: N801 - used as a context manager, like open()
    """Run an ASGI app in a real uvicorn server in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def __enter__(self) -> str:
        self.server, self.thread, self.sock = serve_thread(self.app)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def api(served: str, runtime: Runtime, clock: FixedClock) -> Iterator[Api]:
    # trust_env=False: never route 127.0.0.1 through a proxy from the environment.
    with httpx.Client(base_url=served, headers={"X-API-Key": KEY}, trust_env=False,
                      timeout=30) as client:
        yield Api(client, runtime, clock, served)


def count(db: Engine, model: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def customer(external_id: str, **fields: Any) -> dict[str, Any]:
    return {"external_id": external_id, **fields}


def seed(api: Api) -> None:
    """Ann starts a membership today (onboarding), Bob's ends in 14 days (renewal due)."""
    today = api.clock.now().date()
    assert api.post("/v1/customers/bulk", {"items": [
        customer("ann", first_name="Ann", email="ann@example.com", phone="+4915112345678"),
        customer("bob", first_name="Bob", phone="+4915112345679"),
        customer("cat", first_name="Cat", email="cat@example.com"),
    ]}).json() == {"written": 3}
    assert api.post("/v1/memberships/bulk", {"items": [
        {"external_id": "m-ann", "customer_external_id": "ann", "plan": "annual", "price": 480,
         "starts_on": str(today), "ends_on": str(today + timedelta(days=365))},
        {"external_id": "m-bob", "customer_external_id": "bob", "plan": "monthly", "price": 40,
         "starts_on": str(today - timedelta(days=300)), "ends_on": str(today + timedelta(14))},
    ]}).json() == {"written": 2}
    # Bob said yes to SMS at the front desk (the club's policy needs an explicit yes for SMS)
    assert api.post("/v1/consents/bulk", {"items": [
        {"customer_external_id": "bob", "channel": "sms", "granted": True,
         "occurred_at": "2025-05-06T10:00:00+02:00", "source": "front_desk",
         "wording_version": "2025-01"},
    ]}).json() == {"written": 1}


# the key -----------------------------------------------------------------------------------------

def test_every_endpoint_needs_the_key(served: str) -> None:
    with httpx.Client(base_url=served, trust_env=False) as anonymous:
        for method, path in [("GET", "/v1/triggers"), ("GET", "/v1/triggers/welcome/preview"),
                             ("POST", "/v1/customers/bulk"), ("POST", "/v1/tick"),
                             ("GET", "/v1/customers/ann/messages"),
                             ("GET", "/v1/customers/ann/explain"),
                             ("POST", "/v1/consents/bulk"), ("GET", "/v1/nothing")]:
            response = anonymous.request(method, path, json={"items": [{"bad": 1}]})
            assert response.status_code == 401, path
            assert response.json() == {
                "detail": "missing API key: send it in the X-API-Key header"}
            assert response.headers["www-authenticate"] == 'APIKey header="X-API-Key"'
        wrong = anonymous.get("/v1/triggers", headers={"X-API-Key": KEY + "x"})
        assert wrong.status_code == 401
        assert wrong.json() == {"detail": "invalid API key in the X-API-Key header"}
        assert anonymous.get("/v1/triggers", headers={"X-API-Key": KEY}).status_code == 200
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/docs").status_code == 200


def test_no_key_no_api(runtime: Runtime) -> None:
    for key in (None, "", "   "):
        settings = Settings(_env_file=None, api_key=key)
        with pytest.raises(NoApiKey, match="set TOUCHPOINTS_API_KEY"):
            create_app(dataclasses.replace(runtime, settings=settings))


def test_openapi_has_tags_models_and_the_key_scheme(served: str) -> None:
    with httpx.Client(base_url=served, trust_env=False) as anonymous:
        schema = anonymous.get("/openapi.json").json()
    assert {t["name"] for t in schema["tags"]} >= {"ingestion", "triggers", "customers", "ticks"}
    bulk = schema["paths"]["/v1/customers/bulk"]["post"]
    assert bulk["tags"] == ["ingestion"]
    assert bulk["security"] == [{"APIKeyHeader": []}]
    assert set(bulk["responses"]) >= {"200", "401", "422"}
    assert bulk["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ValidationProblem"}
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the key of TOUCHPOINTS_API_KEY"}
    assert {"CustomerIn", "TriggerOut", "PreviewOut", "MessageOut", "TickOut"} <= set(
        schema["components"]["schemas"])
    assert "security" not in schema["paths"]["/healthz"]["get"]


# ingestion ---------------------------------------------------------------------------------------

def test_customers_upsert_by_external_id(api: Api) -> None:
    batch = [customer(f"c{i}", first_name=f"C{i}", email=f"c{i}@example.com") for i in range(3)]
    assert api.post("/v1/customers/bulk", {"items": batch}).json() == {"written": 3}
    batch[1]["first_name"] = "Renamed"
    assert api.post("/v1/customers/bulk", {"items": batch}).json() == {"written": 3}
    db = api.runtime.engine
    assert count(db, Customer) == 3
    with db.connect() as conn:
        assert conn.execute(select(Customer.first_name).where(Customer.external_id == "c1")) \
            .scalar() == "Renamed"


def test_one_invalid_item_rejects_its_batch_only(api: Api) -> None:
    bad = [customer(f"c{i}", email=f"c{i}@example.com") for i in range(5)]
    bad[3]["email"] = "c3-at-example.com"
    response = api.post("/v1/customers/bulk", {"items": bad})
    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == [{"loc": ["body", "items", 3, "email"],
                               "msg": "not a valid address", "type": "string_pattern_mismatch"}]
    assert body["message"] == ("1 invalid value(s), nothing was written: "
                               "body.items[3].email: not a valid address")
    assert count(api.runtime.engine, Customer) == 0
    good = [customer("d1"), customer("d2", timezone="Europe/London")]
    assert api.post("/v1/customers/bulk", {"items": good}).json() == {"written": 2}
    assert count(api.runtime.engine, Customer) == 2

    several = [customer("e1", phone="0151 123"), customer("e2", timezone="Mars/Base"),
               {"first_name": "no id"}, customer("e4", shoe_size=44)]
    detail = api.post("/v1/customers/bulk", {"items": several}).json()["detail"]
    assert [(d["loc"], d["msg"]) for d in detail] == [
        (["body", "items", 0, "phone"], "not an E.164 phone number such as +4915112345678"),
        (["body", "items", 1, "timezone"], "unknown IANA time zone 'Mars/Base'"),
        (["body", "items", 2, "external_id"], "Field required"),
        (["body", "items", 3, "shoe_size"], "Extra inputs are not permitted"),
    ]


def test_repeated_external_id_and_oversized_batches(api: Api) -> None:
    response = api.post("/v1/customers/bulk", {"items": [customer("a"), customer("b"),
                                                         customer("a")]})
    assert response.status_code == 422
    assert response.json()["detail"] == [{
        "loc": ["body", "items", 2, "external_id"], "type": "duplicate",
        "msg": "duplicate external_id 'a' (first at index 0)"}]
    response = api.post("/v1/customers/bulk",
                        {"items": [customer(f"c{i}") for i in range(10_001)]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "items"]
    assert count(api.runtime.engine, Customer) == 0


def test_memberships_of_unknown_customers_are_rejected(api: Api) -> None:
    seed(api)
    items = [{"external_id": f"m-{who}", "customer_external_id": who,
              "starts_on": "2026-01-01", "ends_on": "2026-12-31"}
             for who in ("cat", "ghost", "ann", "nobody")]
    response = api.post("/v1/memberships/bulk", {"items": items})
    assert response.status_code == 422
    assert response.json() == {
        "message": "2 item(s) refer to unknown customers, nothing of this batch was written: "
                   "body.items[1].customer_external_id: unknown customer 'ghost'; "
                   "body.items[3].customer_external_id: unknown customer 'nobody'",
        "detail": [
            {"loc": ["body", "items", 1, "customer_external_id"],
             "msg": "unknown customer 'ghost'", "type": "unknown_customer"},
            {"loc": ["body", "items", 3, "customer_external_id"],
             "msg": "unknown customer 'nobody'", "type": "unknown_customer"}]}
    db = api.runtime.engine
    assert count(db, Membership) == 2  # the seed's
    backwards = {**items[0], "external_id": "m-x", "starts_on": "2026-02-01",
                 "ends_on": "2026-01-01"}
    ends = api.post("/v1/memberships/bulk", {"items": [{**items[0], "ends_on": "2026-01-31"},
                                                       backwards]})
    assert ends.json()["detail"] == [{
        "loc": ["body", "items", 1, "ends_on"], "type": "value_error",
        "msg": "ends_on 2026-01-01 is before starts_on 2026-02-01"}]
    assert api.post("/v1/memberships/bulk", {"items": items[:1]}).json() == {"written": 1}
    assert count(db, Membership) == 3


def test_events_are_idempotent_with_external_id(api: Api) -> None:
    seed(api)
    now = api.clock.now()
    visits = [{"external_id": f"v{i}", "customer_external_id": "ann", "kind": "visit",
               "occurred_at": (now - timedelta(days=i)).isoformat() + "+00:00"}
              for i in range(1, 3)]
    for _ in range(2):
        assert api.post("/v1/events/bulk", {"items": visits}).json() == {"written": 2}
    db = api.runtime.engine
    assert count(db, Event) == 2
    with db.connect() as conn:
        row = conn.execute(select(Customer.visit_count, Customer.last_visit_at)
                           .where(Customer.external_id == "ann")).one()
    assert row == (2, now - timedelta(days=1))
    anonymous_event = {"customer_external_id": "bob", "kind": "class_booked",
                       "occurred_at": "2026-03-01T10:00:00+01:00"}
    for _ in range(2):
        api.post("/v1/events/bulk", {"items": [anonymous_event]})
    assert count(db, Event) == 4  # no external_id: nothing to recognise a repeat by
    response = api.post("/v1/events/bulk", {"items": [{**anonymous_event, "kind": "Visit!"},
                                                      {**anonymous_event,
                                                       "customer_external_id": "ghost"}]})
    assert response.json()["detail"] == [{
        "loc": ["body", "items", 0, "kind"], "type": "string_pattern_mismatch",
        "msg": "expected lowercase letters, digits and _, starting with a letter"}]


# triggers ----------------------------------------------------------------------------------------

def test_triggers_list_state_and_errors(api: Api) -> None:
    listed = {t["id"]: t for t in api.get("/v1/triggers").json()}
    assert set(listed) == {"welcome", "renewal-entry", "broken-template", "paused"}
    welcome = listed["welcome"]
    assert welcome["status"] == "active" and welcome["enabled"] is True
    assert welcome["description"] == "Welcome new members"
    assert welcome["stage"] == ["onboarding"] and welcome["when"] == "entered stage onboarding"
    assert welcome["path"].endswith("club.yaml") and welcome["errors"] == []
    assert welcome["fired_total"] == 0 and welcome["last_tick_at"] is None
    broken = listed["broken-template"]
    assert broken["status"] == "broken" and broken["enabled"] is False
    assert len(broken["errors"]) == 1 and "test/missing" in broken["errors"][0]
    assert listed["paused"]["status"] == "disabled" and listed["paused"]["enabled"] is False

    seed(api)
    api.post("/v1/tick", {"kind": "full"})
    listed = {t["id"]: t for t in api.get("/v1/triggers").json()}
    assert listed["welcome"]["fired_total"] == 1
    assert listed["welcome"]["last_tick_at"] == "2026-03-02T09:00:00Z"
    assert listed["broken-template"]["fired_total"] == 0


def test_preview_matches_what_the_tick_creates(api: Api) -> None:
    seed(api)
    preview = api.get("/v1/triggers/renewal-entry/preview", sample=5).json()
    assert preview["trigger"] == "renewal-entry"
    assert preview["now"] == "2026-03-02T09:00:00Z"
    assert (preview["would_fire"], preview["would_send"]) == (1, 1)
    assert preview["sample"] == [{"external_id": "bob", "arm": "treatment", "variant": None,
                                  "channel": "sms", "status": "message"}]
    welcome = api.get("/v1/triggers/welcome/preview").json()
    assert welcome["would_fire"] == 1 and welcome["sample"][0]["external_id"] == "ann"
    assert api.get("/v1/triggers/welcome/preview", sample=0).json()["sample"] == []

    tick = api.post("/v1/tick", None).json()  # no body: an incremental tick
    assert tick["kind"] == "incremental" and tick["dry_run"] is False
    assert tick["occurrences"] == {"welcome": welcome["would_fire"],
                                   "renewal-entry": preview["would_fire"]}
    assert tick["messages"] == 2 and tick["now"] == "2026-03-02T09:00:00Z"
    # Fired now: nothing more to preview.
    assert api.get("/v1/triggers/renewal-entry/preview").json()["would_fire"] == 0


def test_dry_run_tick_and_busy_tick(api: Api) -> None:
    seed(api)
    dry = api.post("/v1/tick", {"dry_run": True, "kind": "full"}).json()
    assert dry["dry_run"] is True and dry["messages"] == 2
    assert api.post("/v1/tick", {"dry_run": False}).json()["messages"] == 2
    with api.runtime.engine.begin() as conn:
        take_lease(conn, TICK_LEASE, "someone-else", api.clock.now(), timedelta(minutes=5))
    busy = api.post("/v1/tick", {})
    assert busy.status_code == 409 and busy.headers["retry-after"] == "5"
    assert "another process is ticking" in busy.json()["detail"]
    assert api.post("/v1/tick", {"kind": "sideways"}).status_code == 422


def test_not_found_and_conflicts(api: Api) -> None:
    for path, status, detail in [
        ("/v1/triggers/nope/preview", 404, "unknown trigger 'nope'"),
        ("/v1/triggers/paused/preview", 409, "trigger 'paused' is disabled in its rule file"),
        ("/v1/customers/nobody/messages", 404, "unknown customer 'nobody'"),
    ]:
        response = api.get(path)
        assert (response.status_code, response.json()["detail"]) == (status, detail)
    broken = api.get("/v1/triggers/broken-template/preview")
    assert broken.status_code == 409
    assert broken.json()["detail"].startswith("trigger 'broken-template' is broken and disabled: ")
    assert api.get("/v1/nothing").status_code == 404
    assert api.get("/v1/triggers/welcome/preview", sample=-1).json()["detail"][0]["loc"] == [
        "query", "sample"]


# messages ----------------------------------------------------------------------------------------

def test_customer_messages_with_outcomes_newest_first(api: Api) -> None:
    seed(api)
    assert api.get("/v1/customers/ann/messages").json() == {"customer": "ann", "messages": []}
    api.post("/v1/tick", {"kind": "full"})
    report = api.runtime.dispatcher().drain()
    assert report.sent == 2
    # A week later Ann's membership is cut short: she enters renewal_due, a second message.
    api.clock.advance(timedelta(days=7))
    today = api.clock.now().date()
    api.post("/v1/memberships/bulk", {"items": [{
        "external_id": "m-ann", "customer_external_id": "ann", "plan": "annual", "price": 480,
        "starts_on": str(today - timedelta(days=7)), "ends_on": str(today + timedelta(days=10))}]})
    api.post("/v1/consents/bulk", {"items": [{
        "customer_external_id": "ann", "channel": "sms", "granted": True,
        "occurred_at": "2026-03-08T12:00:00Z", "source": "app"}]})
    assert api.post("/v1/tick", {}).json()["occurrences"]["renewal-entry"] == 1

    messages = api.get("/v1/customers/ann/messages").json()["messages"]
    assert [(m["trigger_id"], m["channel"], m["status"]) for m in messages] == [
        ("renewal-entry", "sms", "queued"), ("welcome", "email", "sent")]
    newest, welcome = messages
    assert newest["outcomes"] == [] and newest["recipient"] == "+4915112345678"
    assert newest["created_at"] == "2026-03-09T09:00:00Z"
    assert welcome["recipient"] == "ann@example.com" and welcome["attempts"] == 1
    assert welcome["sent_at"] == "2026-03-02T09:00:00Z"
    assert welcome["provider_message_id"] == f"console-{welcome['id']}"
    assert welcome["outcomes"] == [{"status": "sent", "occurred_at": "2026-03-02T09:00:00Z",
                                    "source": "dispatch", "detail": {}}]
    assert len(api.get("/v1/customers/ann/messages", limit=1).json()["messages"]) == 1
    assert api.get("/v1/customers/cat/messages").json()["messages"] == []


def test_the_server_answers_concurrent_clients(api: Api) -> None:
    seed(api)

    def fetch(_: int) -> int:
        with httpx.Client(base_url=api.url, headers={"X-API-Key": KEY}, trust_env=False) as c:
            return c.get("/v1/triggers").status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(fetch, range(8))) == {200}


def test_explain_names_the_policy_that_stopped_a_trigger(api: Api) -> None:
    seed(api)
    # Ann's membership ends in 10 days, but she never said yes to SMS
    today = api.clock.now().date()
    api.post("/v1/memberships/bulk", {"items": [{
        "external_id": "m-ann", "customer_external_id": "ann", "plan": "annual", "price": 480,
        "starts_on": str(today - timedelta(days=355)),
        "ends_on": str(today + timedelta(days=10))}]})
    tick = api.post("/v1/tick", {"kind": "full"}).json()
    assert tick["occurrences"]["renewal-entry"] == 2 and tick["stopped"] == {"channel": 1}
    story = api.get("/v1/customers/ann/explain").json()
    assert story["stage"]["recorded"] == "renewal_due"
    assert [(d["trigger"], d["status"], d["reason"]) for d in story["decisions"]] == [
        ("renewal-entry", "skipped", "no_consent (sms)")]
    consent = {(c["channel"], c["purpose"]): (c["granted"], c["source"])
               for c in story["consent"]}
    assert consent[("sms", "marketing")] == (False, "policy default")
    assert consent[("email", "marketing")] == (True, "policy default")
    renewal = next(t for t in story["triggers"] if t["trigger"] == "renewal-entry")
    assert renewal["verdict"].endswith("(skipped: no_consent (sms))")
    assert story["messages"] == []
    assert api.get("/v1/customers/nobody/explain").status_code == 404


def test_consent_batches_name_unknown_customers_and_channels(api: Api) -> None:
    seed(api)
    response = api.post("/v1/consents/bulk", {"items": [
        {"customer_external_id": "ann", "channel": "sms", "granted": True,
         "occurred_at": "2026-03-01T10:00:00Z"},
        {"customer_external_id": "ghost", "channel": "sms", "granted": True,
         "occurred_at": "2026-03-01T10:00:00Z"},
        {"customer_external_id": "ann", "channel": "fax", "granted": True,
         "occurred_at": "2026-03-01T10:00:00Z"}]})
    assert response.status_code == 422
    assert [(e["loc"], e["msg"]) for e in response.json()["detail"]] == [
        (["body", "items", 1, "customer_external_id"], "unknown customer 'ghost'"),
        (["body", "items", 2, "channel"], "unknown channel 'fax' (known: chat, email, sms)")]
    response = api.post("/v1/consents/bulk", {"items": [
        {"customer_external_id": "ann", "channel": "sms", "granted": "yes",
         "occurred_at": "2026-03-01T10:00:00Z"}]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "granted"]
