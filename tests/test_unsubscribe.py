"""Unsubscribe links over the real API app on a real server: the signed token, the confirm page
(which changes nothing), the form and RFC 8058 one-click POSTs, bad tokens (404, nothing
changes), and end to end: an email sent through the real SendGrid SDK to the fake carries a
List-Unsubscribe link that works."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, insert
from starlette.types import ASGIApp, Receive, Scope, Send

from channels.base import load_adapter
from engine.api import API_KEY_HEADER, create_app
from engine.clock import FixedClock
from engine.config import ProjectConfig
from engine.ingest import CustomerIn, Ingestor
from engine.models import ConsentEntry
from engine.runtime import Runtime
from engine.settings import Settings
from engine.unsubscribe import UnsubscribeLinks, unsubscribe_url_builder
from tests.conftest import ROOT
from tests.fakes.sendgrid import API_KEY, FakeSendGrid
from tests.fakes.server import Served
from tests.test_opt_out import ann, rows
from tests.test_webhooks_sendgrid import queue_email

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

SECRET = "unsubscribe-5ecret-of-at-least-16"
KEY = "api-key-for-the-unsubscribe-tests"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


class Later:
    """An ASGI app set after the server started, so the app's settings can name its URL."""

    app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        await self.app(scope, receive, send)


def make_settings(tmp_path: Path, public_url: str | None = None,
                  secret: str | None = SECRET) -> Settings:
    (tmp_path / "rules").mkdir(exist_ok=True)
    return Settings(rules_dir=tmp_path / "rules",
                    templates_dir=ROOT / "tests" / "testdata" / "templates",
                    config_dir=ROOT / "config", api_key=SecretStr(KEY), public_url=public_url,
                    unsubscribe_secret=None if secret is None else SecretStr(secret))


@pytest.fixture
def api(tmp_path: Path, db: Engine, clock: FixedClock) -> Iterator[tuple[Served, Runtime]]:
    """The whole API app, its public URL the server's own."""
    later = Later()
    with Served(later) as served:
        runtime = Runtime.load(make_settings(tmp_path, served.url), clock, engine=db,
                               migrate_db=False)
        later.app = create_app(runtime)
        Ingestor(db, clock).customers([
            CustomerIn(external_id="ann", first_name="Ann", email="ann@example.com")])
        yield served, runtime


def link(runtime: Runtime, customer_id: int, channel: str = "email") -> str:
    links = UnsubscribeLinks.from_settings(runtime.settings)
    assert links is not None
    return links.url(customer_id, channel)


def consent(db: Engine) -> list[dict[str, Any]]:
    return rows(db, ConsentEntry, "customer_id", "channel", "purpose", "granted", "source")


def test_tokens_verify_only_as_issued() -> None:
    links = UnsubscribeLinks(SecretStr(SECRET), "https://tp.example.com/")
    token = links.token(42, "email")
    assert links.read(token) == (42, "email")
    assert links.url(42, "email") == f"https://tp.example.com/unsubscribe/{token}"
    payload, mac = token.split(".")
    other = UnsubscribeLinks(SecretStr(SECRET + "!")).token(42, "email")
    forged = [other, f"{links.token(43, 'email').split('.')[0]}.{mac}", f"{payload}.{mac[:-1]}",
              f"{payload}.{mac[:-2]}{'A' if mac[-2] != 'A' else 'B'}{mac[-1]}", payload, "",
              "...", f"{payload}.{mac}.x", "é.é"]
    assert [links.read(t) for t in forged] == [None] * len(forged)
    with pytest.raises(ValueError, match="at least 16"):
        UnsubscribeLinks(SecretStr("short"))
    with pytest.raises(ValueError, match="PUBLIC_URL"):
        UnsubscribeLinks(SecretStr(SECRET)).url(1, "email")


def test_links_are_made_for_email_channels_only(tmp_path: Path,
                                                project_config: ProjectConfig) -> None:
    build = unsubscribe_url_builder(make_settings(tmp_path, "https://tp.example.com"),
                                    project_config.channels)
    assert build is not None
    assert (build(7, "email") or "").startswith("https://tp.example.com/unsubscribe/")
    assert build(7, "sms") is None and build(7, "chat") is None
    assert unsubscribe_url_builder(make_settings(tmp_path), project_config.channels) is None
    assert unsubscribe_url_builder(make_settings(tmp_path, "https://tp.example.com", None),
                                   project_config.channels) is None


def test_the_page_asks_and_the_form_unsubscribes_once(
        db: Engine, api: tuple[Served, Runtime]) -> None:
    _, runtime = api
    url = link(runtime, ann(db))
    page = httpx.get(url, timeout=5)  # no API key: the token is the proof
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in page.text and "Riverside" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert consent(db) == []  # opening the link changes nothing
    for _ in range(2):
        done = httpx.post(url, data={"confirm": "yes"}, timeout=5)
        assert done.status_code == 200 and "unsubscribed" in done.text
    assert consent(db) == [{"customer_id": ann(db), "channel": "email", "purpose": "marketing",
                            "granted": False, "source": "unsubscribe:link"}]


def test_one_click_unsubscribes_and_again_after_consent_is_given_back(
        db: Engine, clock: FixedClock, api: tuple[Served, Runtime]) -> None:
    _, runtime = api
    customer = ann(db)
    url = link(runtime, customer)
    assert httpx.post(url, data=ONE_CLICK, timeout=5).status_code == 200
    with db.begin() as conn:  # she opts in again, e.g. at the front desk
        conn.execute(insert(ConsentEntry).values(
            customer_id=customer, channel="email", purpose="marketing", granted=True,
            occurred_at=clock.now(), source="front_desk"))
    assert httpx.post(url, data=ONE_CLICK, timeout=5).status_code == 200
    assert [(e["granted"], e["source"]) for e in consent(db)] == [
        (False, "unsubscribe:one-click"), (True, "front_desk"), (False, "unsubscribe:one-click")]


def test_bad_tokens_are_not_found_and_change_nothing(
        db: Engine, api: tuple[Served, Runtime]) -> None:
    served, runtime = api
    good = link(runtime, ann(db)).rsplit("/", 1)[1]
    payload, mac = good.split(".")
    other_secret = UnsubscribeLinks(SecretStr(SECRET + "x")).token(ann(db), "email")
    nobody = link(runtime, 999_999).rsplit("/", 1)[1]  # genuine, but no such customer
    for token in ("garbage", f"{payload}.{mac[::-1]}", other_secret, nobody, payload):
        url = f"{served.url}/unsubscribe/{token}"
        if token != nobody:
            assert httpx.get(url, timeout=5).status_code == 404
        assert httpx.post(url, data=ONE_CLICK, timeout=5).status_code == 404
    assert consent(db) == []
    # everything else still needs the key
    assert httpx.get(f"{served.url}/v1/triggers", timeout=5).status_code == 401
    assert httpx.get(f"{served.url}/v1/triggers", headers={API_KEY_HEADER: KEY},
                     timeout=5).status_code == 200


def test_without_a_secret_there_are_no_links(
        tmp_path: Path, db: Engine, clock: FixedClock) -> None:
    runtime = Runtime.load(make_settings(tmp_path, "https://tp.example.com", None), clock,
                           engine=db, migrate_db=False)
    token = UnsubscribeLinks(SecretStr(SECRET)).token(1, "email")
    with Served(create_app(runtime)) as served:
        assert httpx.post(f"{served.url}/unsubscribe/{token}", data=ONE_CLICK,
                          timeout=5).status_code == 404
    assert consent(db) == []


def test_a_sent_email_carries_a_working_one_click_link(
        db: Engine, clock: FixedClock, project_config: ProjectConfig,
        api: tuple[Served, Runtime]) -> None:
    served, runtime = api
    fake = FakeSendGrid()
    fake.start()
    try:
        channel = load_adapter("sendgrid").from_config("email", {
            "api_key": API_KEY, "from_email": "club@example.com", "host": fake.url,
            "timeout": 5.0})
        queue_email(db, clock, project_config, "welcome")
        assert runtime.dispatcher({"email": channel}).drain().sent == 1
        [mail] = fake.requests
        headers = mail.body["headers"]
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = headers["List-Unsubscribe"].strip("<>")
        assert url.startswith(served.url + "/unsubscribe/")
        # what a mail client does for the one-click button (RFC 8058)
        response = httpx.post(url, content=b"List-Unsubscribe=One-Click", timeout=5,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200
        assert [(e["channel"], e["granted"]) for e in consent(db)] == [("email", False)]
        # and no more marketing email goes to her
        if queue_email(db, clock, project_config, "tips"):
            runtime.dispatcher({"email": channel}).drain()
        assert len(fake.requests) == 1
        channel.close()
    finally:
        fake.stop()
