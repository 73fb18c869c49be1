"""Telegram's webhook over a real server: the fake Bot API, told where to post with `setWebhook`,
delivers updates with the secret token; `/stop` withdraws marketing consent on the chat channel,
`/start` gives it back; a wrong or missing secret gets 403 and changes nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import Engine

from engine.clock import FixedClock
from engine.ingest import CustomerIn, Ingestor
from engine.models import ConsentEntry
from engine.runtime import Runtime
from engine.settings import Settings
from engine.webhooks import make_webhook_router
from tests.conftest import ROOT
from tests.fakes.server import Served
from tests.fakes.telegram import BOT_TOKEN, FakeTelegram
from tests.test_opt_out import rows

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

SECRET = "tg-webhook-5ecret_token-1"
CHAT = 4242


@pytest.fixture(scope="module")
def telegram() -> Iterator[FakeTelegram]:
    fake = FakeTelegram()
    fake.start()
    yield fake
    fake.stop()


def load(db: Engine, clock: FixedClock, secret: str | None = SECRET) -> Runtime:
    settings = Settings(rules_dir=ROOT / "rules", templates_dir=ROOT / "templates",
                        config_dir=ROOT / "config",
                        telegram_webhook_secret=None if secret is None else SecretStr(secret))
    runtime = Runtime.load(settings, clock, engine=db, migrate_db=False)
    Ingestor(db, clock).customers([
        CustomerIn(external_id="ann", first_name="Ann", chat_id=str(CHAT)),
        CustomerIn(external_id="bob", first_name="Bob", chat_id="777")])
    return runtime


def serve(runtime: Runtime, telegram: FakeTelegram) -> Served:
    """The webhook routes, registered at the fake Bot API with the configured secret."""
    app = FastAPI()
    app.include_router(make_webhook_router(runtime))
    served = Served(app)
    secret = runtime.settings.telegram_webhook_secret
    response = httpx.post(f"{telegram.url}/bot{BOT_TOKEN}/setWebhook", json={
        "url": served.url + "/webhooks/telegram",
        **({"secret_token": secret.get_secret_value()} if secret else {})}, timeout=5)
    assert response.json()["ok"] is True
    return served


@pytest.fixture
def server(db: Engine, clock: FixedClock, telegram: FakeTelegram) -> Iterator[Served]:
    with serve(load(db, clock), telegram) as served:
        yield served


def consent(db: Engine) -> list[dict[str, Any]]:
    return rows(db, ConsentEntry, "customer_id", "channel", "purpose", "granted")


def test_stop_and_start_change_chat_consent(
        db: Engine, telegram: FakeTelegram, server: Served) -> None:
    assert telegram.push(CHAT, "/stop").status_code == 204
    [entry] = consent(db)
    assert entry == {"customer_id": 1, "channel": "chat", "purpose": "marketing",
                     "granted": False}
    assert telegram.push(CHAT, "/start").status_code == 204
    assert [e["granted"] for e in consent(db)] == [False, True]
    # in a group the command names the bot; anything after it is ignored
    assert telegram.push(CHAT, "/stop@RiversideClubBot please").status_code == 204
    assert [e["granted"] for e in consent(db)] == [False, True, False]


@pytest.mark.parametrize("text", ["stop", "hello /stop", "/stopp", "", "/help"])
def test_other_messages_change_nothing(
        text: str, db: Engine, telegram: FakeTelegram, server: Served) -> None:
    assert telegram.push(CHAT, text).status_code == 204
    assert telegram.push(999, "/stop").status_code == 204  # nobody's chat
    assert consent(db) == []


@pytest.mark.parametrize("secret", ["", "wrong-secret", SECRET + "x", SECRET[:-1]])
def test_a_wrong_or_missing_secret_is_refused(
        secret: str, db: Engine, telegram: FakeTelegram, server: Served) -> None:
    assert telegram.push(CHAT, "/stop", secret=secret).status_code == 403
    assert consent(db) == []


def test_updates_that_are_not_messages_are_acknowledged(
        db: Engine, server: Served) -> None:
    url = server.url + "/webhooks/telegram"
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
    for body in ({"update_id": 1, "edited_message": {"chat": {"id": CHAT}, "text": "/stop"}},
                 {"update_id": 2, "message": {"chat": {"id": CHAT}, "sticker": {}}}, []):
        assert httpx.post(url, json=body, headers=headers, timeout=5).status_code == 204
    bad = httpx.post(url, content=b"{", headers=headers, timeout=5)
    assert bad.status_code == 400
    assert consent(db) == []


def test_without_a_configured_secret_everything_is_refused(
        db: Engine, clock: FixedClock, telegram: FakeTelegram) -> None:
    with serve(load(db, clock, secret=None), telegram):
        assert telegram.push(CHAT, "/stop", secret="").status_code == 403
        assert telegram.push(CHAT, "/stop", secret="anything").status_code == 403
    assert consent(db) == []
