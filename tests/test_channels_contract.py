"""One contract for every registered channel adapter, each run through its real SDK or library
against a local fake provider: success, each class of error answer, a late answer, a dropped
connection, a refused connection, pacing, and secrets kept out of errors and logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from channels.base import (
    Channel,
    OutgoingMessage,
    SendResult,
    SendStatus,
    adapter_names,
    load_adapter,
)
from channels.errors import ErrorTableError, load_error_table, retry_after_seconds
from channels.ratelimit import RateLimiter
from channels.webhook import verify_signature
from tests.fakes import Fake, Recorded
from tests.fakes.sendgrid import API_KEY, RESET_IN, FakeSendGrid
from tests.fakes.smtp import PASSWORD, USERNAME, Delivered, FakeSmtp, make_certificate
from tests.fakes.telegram import BOT_TOKEN, FakeTelegram
from tests.fakes.twilio import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from tests.fakes.webhook import PATH, SECRET, FakeReceiver

os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

AnyFake = Fake | FakeSmtp
Certs = tuple[Path, Path]

PHONE = "+15551230000"
SENDER = "+15550001111"
SERVICE_SID = "MG" + "fedcba9876543210" * 2
UNSUBSCRIBE = "https://club.example/unsubscribe/42"
CALLBACK = "https://hooks.club.example/twilio/status"
TIMEOUT = 5.0
SHORT_TIMEOUT = 0.3  # the late-answer cases: the fake waits far longer than this


@dataclass(frozen=True)
class Expect:
    """What one scripted error answer must become."""

    status: SendStatus
    error_class: str
    retry_after: float | None = None
    requests: int = 1  # what the fake records; SMTP records only messages that reached DATA


@dataclass(frozen=True)
class Contract:
    """How to run one adapter against its fake, and what its one request must look like."""

    adapter: str
    make_fake: Callable[[Certs], AnyFake]
    settings: Callable[[Any], dict[str, Any]]
    recipient: str
    check: Callable[[Any, OutgoingMessage], None]
    errors: dict[str, Expect]
    secrets: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def message(contract: Contract, message_id: int = 42, subject: str | None = "Hello Ann",
            **metadata: Any) -> OutgoingMessage:
    return OutgoingMessage(message_id=message_id, channel="test", recipient=contract.recipient,
                           body="Hi Ann, see you at Riverside.\n", subject=subject,
                           trigger_id="welcome", customer_external_id="ann",
                           metadata={"unsubscribe_url": UNSUBSCRIBE, **metadata})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# what each provider must receive ---------------------------------------------------------------

def check_twilio_sms(rec: Recorded, msg: OutgoingMessage) -> None:
    assert (rec.method, rec.path) == ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    assert rec.headers["authorization"] == basic(ACCOUNT_SID, AUTH_TOKEN)
    assert rec.headers["content-type"] == "application/x-www-form-urlencoded"
    assert rec.body == {"To": PHONE, "From": SENDER, "Body": msg.body,
                        "StatusCallback": f"{CALLBACK}?touchpoints_message_id={msg.message_id}"}


def check_twilio_whatsapp(rec: Recorded, msg: OutgoingMessage) -> None:
    assert (rec.method, rec.path) == ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
    assert rec.headers["authorization"] == basic(ACCOUNT_SID, AUTH_TOKEN)
    assert rec.body == {"To": f"whatsapp:{PHONE}", "MessagingServiceSid": SERVICE_SID,
                        "Body": msg.body}


def check_sendgrid(rec: Recorded, msg: OutgoingMessage) -> None:
    assert (rec.method, rec.path) == ("POST", "/v3/mail/send")
    assert rec.headers["authorization"] == f"Bearer {API_KEY}"
    assert rec.body == {
        "from": {"email": "club@example.com", "name": "Riverside"},
        "subject": msg.subject,
        "personalizations": [{"to": [{"email": "ann@example.com"}]}],
        "content": [{"type": "text/plain", "value": msg.body}],
        "custom_args": {"touchpoints_message_id": str(msg.message_id),
                        "touchpoints_trigger_id": "welcome"},
        "headers": {"List-Unsubscribe": f"<{UNSUBSCRIBE}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    }


def check_smtp(rec: Delivered, msg: OutgoingMessage) -> None:
    assert rec.login == USERNAME and rec.tls
    assert (rec.mail_from, rec.rcpt_tos) == ("club@example.com", ["ann@example.com"])
    mail = rec.message
    assert mail["From"] == "Riverside <club@example.com>" and mail["To"] == "ann@example.com"
    assert mail["Subject"] == msg.subject
    assert mail["X-Touchpoints-Message-Id"] == str(msg.message_id)
    assert mail["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_content().replace("\r\n", "\n") == msg.body


def check_telegram(rec: Recorded, msg: OutgoingMessage) -> None:
    assert (rec.method, rec.path) == ("POST", f"/bot{BOT_TOKEN}/sendMessage")
    assert rec.body == {"chat_id": "4242", "text": msg.body}


def check_webhook(rec: Recorded, msg: OutgoingMessage) -> None:
    assert (rec.method, rec.path) == ("POST", PATH)
    timestamp = rec.headers["x-touchpoints-timestamp"]
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + rec.raw,
                        hashlib.sha256).hexdigest()
    assert rec.headers["x-touchpoints-signature"] == f"sha256={expected}"
    assert verify_signature(SECRET, timestamp, rec.raw, rec.headers["x-touchpoints-signature"])
    assert abs(int(timestamp) - time.time()) < 60
    assert rec.headers["x-touchpoints-message-id"] == str(msg.message_id)
    assert rec.body == {"message_id": msg.message_id, "channel": msg.channel,
                        "recipient": "ann@example.com", "subject": msg.subject,
                        "body": msg.body, "trigger_id": "welcome",
                        "customer_external_id": "ann",
                        "metadata": {"unsubscribe_url": UNSUBSCRIBE}}


def _twilio(**sender: str) -> Callable[[Fake], dict[str, Any]]:
    return lambda fake: {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                         "base_url": fake.url, "timeout": TIMEOUT, "rate_per_second": None,
                         **sender}


TWILIO_ERRORS = {
    "21610": Expect(SendStatus.FAILED, "opt_out"),
    "21211": Expect(SendStatus.FAILED, "invalid_recipient"),
    "21614": Expect(SendStatus.FAILED, "invalid_recipient"),
    "21408": Expect(SendStatus.FAILED, "permanent"),
    "20429": Expect(SendStatus.RETRY, "transient", retry_after=7),
    "500": Expect(SendStatus.RETRY, "transient"),
}

CONTRACTS = [
    Contract(
        adapter="twilio_sms", make_fake=lambda _: FakeTwilio(),
        settings=lambda fake: {**_twilio(from_number=SENDER)(fake),
                               "status_callback_base_url": CALLBACK},
        recipient=PHONE, check=check_twilio_sms, errors=TWILIO_ERRORS, secrets=(AUTH_TOKEN,)),
    Contract(
        adapter="twilio_whatsapp", make_fake=lambda _: FakeTwilio(),
        settings=_twilio(messaging_service_sid=SERVICE_SID),
        recipient=PHONE, check=check_twilio_whatsapp, errors=TWILIO_ERRORS,
        secrets=(AUTH_TOKEN,)),
    Contract(
        adapter="sendgrid", make_fake=lambda _: FakeSendGrid(),
        settings=lambda fake: {"api_key": API_KEY, "from_email": "club@example.com",
                               "from_name": "Riverside", "host": fake.url, "timeout": TIMEOUT},
        recipient="ann@example.com", check=check_sendgrid, secrets=(API_KEY,),
        errors={"400": Expect(SendStatus.FAILED, "permanent"),
                "401": Expect(SendStatus.FAILED, "permanent"),
                "413": Expect(SendStatus.FAILED, "permanent"),
                "429": Expect(SendStatus.RETRY, "transient", retry_after=RESET_IN),
                "500": Expect(SendStatus.RETRY, "transient")}),
    Contract(
        adapter="smtp", make_fake=lambda certs: FakeSmtp(*certs),
        settings=lambda fake: {"host": fake.host, "port": fake.port, "username": USERNAME,
                               "password": PASSWORD, "ca_file": str(fake.cert),
                               "from_email": "club@example.com", "from_name": "Riverside",
                               "timeout": TIMEOUT},
        recipient="ann@example.com", check=check_smtp, secrets=(PASSWORD,),
        errors={"550": Expect(SendStatus.FAILED, "invalid_recipient", requests=0),
                "451": Expect(SendStatus.RETRY, "transient"),
                "554": Expect(SendStatus.FAILED, "permanent")}),
    Contract(
        adapter="telegram", make_fake=lambda _: FakeTelegram(),
        settings=lambda fake: {"bot_token": BOT_TOKEN, "api_base": fake.url,
                               "timeout": TIMEOUT, "rate_per_second": None},
        recipient="4242", check=check_telegram, secrets=(BOT_TOKEN, BOT_TOKEN.split(":")[1]),
        errors={"403": Expect(SendStatus.FAILED, "opt_out"),
                "400": Expect(SendStatus.FAILED, "invalid_recipient"),
                "429": Expect(SendStatus.RETRY, "transient", retry_after=5),
                "502": Expect(SendStatus.RETRY, "transient")}),
    Contract(
        adapter="webhook", make_fake=lambda _: FakeReceiver(),
        settings=lambda fake: {"url": fake.url + PATH, "secret": SECRET, "timeout": TIMEOUT},
        recipient="ann@example.com", check=check_webhook, secrets=(SECRET,),
        errors={"400": Expect(SendStatus.FAILED, "permanent"),
                "429": Expect(SendStatus.RETRY, "transient", retry_after=12),
                "503": Expect(SendStatus.RETRY, "transient")}),
]
BY_NAME = {c.adapter: c for c in CONTRACTS}
ERROR_CASES = [pytest.param(c, name, expect, id=f"{c.adapter}-{name}")
               for c in CONTRACTS for name, expect in c.errors.items()]
each_adapter = pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.adapter)


# fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certificate(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture(scope="module")
def fakes(certs: Certs) -> Iterator[dict[str, AnyFake]]:
    """One running fake per adapter for the whole module; each test resets the one it uses."""
    running: dict[str, AnyFake] = {}
    try:
        for contract in CONTRACTS:
            fake = contract.make_fake(certs)
            fake.start()
            running[contract.adapter] = fake
        yield running
    finally:
        for fake in running.values():
            fake.stop()


class Adapters:
    """Builds adapters the way the engine does, and closes them after the test."""

    def __init__(self) -> None:
        self.built: list[Channel] = []

    def build(self, contract: Contract, fake: AnyFake, *, limiter: RateLimiter | None = None,
              **overrides: Any) -> Channel:
        cls = load_adapter(contract.adapter)
        raw = {**contract.settings(fake), **overrides}
        if limiter is None:
            adapter = cls.from_config(contract.adapter, raw)
        else:
            adapter = cls(contract.adapter, cls.Settings.model_validate(raw),
                          limiter=limiter)  # type: ignore[call-arg]
        self.built.append(adapter)
        return adapter


@pytest.fixture
def adapters() -> Iterator[Adapters]:
    made = Adapters()
    yield made
    for adapter in made.built:
        adapter.close()


def ready(fakes: dict[str, AnyFake], contract: Contract) -> AnyFake:
    fake = fakes[contract.adapter]
    fake.reset()
    return fake


# the contract ----------------------------------------------------------------------------------

def test_every_registered_adapter_has_a_contract() -> None:
    assert set(adapter_names()) - {"console"} == set(BY_NAME)


@each_adapter
def test_success_is_one_correct_request(contract: Contract, fakes: dict[str, AnyFake],
                                        adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    msg = message(contract)
    result = adapters.build(contract, fake).send(msg)
    assert result == SendResult(SendStatus.SENT, provider_message_id=fake.issued[0])
    assert len(fake.requests) == 1
    contract.check(fake.requests[0], msg)


@pytest.mark.parametrize(("contract", "error", "expect"), ERROR_CASES)
def test_error_answers_are_classified(contract: Contract, error: str, expect: Expect,
                                      fakes: dict[str, AnyFake], adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    fake.fail(error)
    result = adapters.build(contract, fake).send(message(contract))
    assert (result.status, result.error_class) == (expect.status, expect.error_class)
    assert result.provider_message_id is None
    assert result.error is not None and result.error.startswith(f"{expect.error_class}: ")
    if expect.retry_after is None:
        assert result.retry_after is None
    else:
        assert result.retry_after == pytest.approx(expect.retry_after, abs=1.5)
    assert len(fake.requests) == expect.requests


@each_adapter
def test_answer_later_than_the_timeout_is_unknown(contract: Contract,
                                                  fakes: dict[str, AnyFake],
                                                  adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    fake.delay(3.0)
    adapter = adapters.build(contract, fake, timeout=SHORT_TIMEOUT)
    started = time.monotonic()
    result = adapter.send(message(contract))
    assert time.monotonic() - started < 2.0  # the client's timeout, not the fake's delay
    assert result.status is SendStatus.UNKNOWN and result.error_class is None
    assert len(fake.requests) == 1  # it arrived: sending again could deliver it twice


@each_adapter
def test_connection_dropped_after_the_request_is_unknown(contract: Contract,
                                                         fakes: dict[str, AnyFake],
                                                         adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    fake.drop()
    result = adapters.build(contract, fake).send(message(contract))
    assert result.status is SendStatus.UNKNOWN and result.error_class is None
    assert len(fake.requests) == 1


@each_adapter
def test_connection_refused_is_retried(contract: Contract, certs: Certs,
                                       adapters: Adapters) -> None:
    stopped = contract.make_fake(certs)
    stopped.start()
    stopped.stop()
    result = adapters.build(contract, stopped).send(message(contract))
    assert (result.status, result.error_class) == (SendStatus.RETRY, "transient")
    assert result.error is not None and "not sent" in result.error


class ManualClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@each_adapter
def test_a_burst_is_paced_not_rejected(contract: Contract, fakes: dict[str, AnyFake],
                                       adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    clock = ManualClock()
    rate, count = 4.0, 9
    adapter = adapters.build(contract, fake, limiter=RateLimiter(rate, 1, clock=clock,
                                                                 sleep=clock.sleep))
    results = [adapter.send(message(contract, message_id=i)) for i in range(count)]
    assert [r.status for r in results] == [SendStatus.SENT] * count
    assert len(fake.requests) == count
    assert clock.now - 1000.0 == pytest.approx((count - 1) / rate)  # ~ N/R: one token up front
    assert clock.sleeps == pytest.approx([1 / rate] * (count - 1))


@each_adapter
def test_the_rate_in_the_settings_paces_real_time(contract: Contract,
                                                  fakes: dict[str, AnyFake],
                                                  adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    rate, count = 25.0, 4
    # a rate no other test uses, so no bucket is shared with them
    adapter = adapters.build(contract, fake, rate_per_second=rate + 0.125)
    started = time.monotonic()
    for i in range(count):
        assert adapter.send(message(contract, message_id=i)).status is SendStatus.SENT
    assert time.monotonic() - started >= (count - 1) / (rate + 0.125) - 0.01


@each_adapter
def test_secrets_stay_out_of_errors_and_logs(contract: Contract, fakes: dict[str, AnyFake],
                                             adapters: Adapters,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = ready(fakes, contract)
    adapter = adapters.build(contract, fake)
    results = [adapter.send(message(contract))]
    fake.fail(next(iter(contract.errors)))
    results.append(adapter.send(message(contract)))
    fake.drop()
    results.append(adapter.send(message(contract)))
    client_side = [r.getMessage() for r in caplog.records
                   if not r.name.startswith(("uvicorn", "mail.log", "asyncio"))]
    for secret in contract.secrets:
        assert all(secret not in (r.error or "") for r in results)
        assert all(secret not in line for line in client_side)
        assert secret not in repr(adapter.settings)


@pytest.mark.parametrize("contract", [BY_NAME["sendgrid"], BY_NAME["smtp"]],
                         ids=lambda c: c.adapter)
def test_email_without_a_subject_gets_its_first_line(contract: Contract,
                                                     fakes: dict[str, AnyFake],
                                                     adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    assert adapters.build(contract, fake).send(message(contract, subject=None)).status \
        is SendStatus.SENT
    sent = fake.requests[0]
    subject = sent.message["Subject"] if isinstance(sent, Delivered) else sent.body["subject"]
    assert subject == "Hi Ann, see you at Riverside."


@pytest.mark.parametrize("contract", [BY_NAME["sendgrid"], BY_NAME["smtp"]],
                         ids=lambda c: c.adapter)
def test_no_unsubscribe_url_no_list_unsubscribe(contract: Contract, fakes: dict[str, AnyFake],
                                                adapters: Adapters) -> None:
    fake = ready(fakes, contract)
    msg = OutgoingMessage(7, "email", "ann@example.com", "Hi\n", "Hi")
    assert adapters.build(contract, fake).send(msg).status is SendStatus.SENT
    sent = fake.requests[0]
    if isinstance(sent, Delivered):
        assert "List-Unsubscribe" not in sent.message
    else:
        assert "headers" not in sent.body


def test_unsubscribe_url_from_the_settings_template(fakes: dict[str, AnyFake],
                                                    adapters: Adapters) -> None:
    contract = BY_NAME["sendgrid"]
    fake = ready(fakes, contract)
    adapter = adapters.build(contract, fake, unsubscribe_url_template=(
        "https://club.example/u?m={message_id}&c={customer_external_id}"))
    msg = OutgoingMessage(7, "email", "ann@example.com", "Hi\n", "Hi", customer_external_id="ann")
    assert adapter.send(msg).status is SendStatus.SENT
    sent = fake.requests[0]
    assert isinstance(sent, Recorded)
    assert sent.body["headers"]["List-Unsubscribe"] == \
        "<https://club.example/u?m=7&c=ann>"


@pytest.mark.parametrize(("adapter", "raw", "problem"), [
    ("twilio_sms", {"account_sid": ACCOUNT_SID, "auth_token": "t"}, "exactly one"),
    ("twilio_sms", {"account_sid": "nope", "auth_token": "t", "from_number": SENDER},
     "account_sid"),
    ("sendgrid", {"api_key": "k", "from_email": "club"}, "email address"),
    ("sendgrid", {"api_key": "k", "from_email": "a@b.co", "unsubscribe_url_template": "{x}"},
     "placeholder"),
    ("smtp", {"host": "h", "from_email": "a@b.co", "username": "u"}, "both"),
    ("telegram", {"bot_token": "not-a-token"}, "bot_token"),
    ("webhook", {"url": "ftp://x", "secret": SECRET}, "http"),
    ("webhook", {"url": "https://x", "secret": "short"}, "secret"),
    ("webhook", {"url": "https://x", "secret": SECRET,
                 "headers": {"X-Touchpoints-Signature": "x"}}, "set by the channel"),
    ("twilio_sms", {"account_sid": ACCOUNT_SID, "auth_token": "t", "from_number": SENDER,
                    "unknown": 1}, "unknown"),
])
def test_a_bad_setting_fails_at_construction(adapter: str, raw: dict[str, Any],
                                             problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        load_adapter(adapter).from_config(adapter, raw)


# the parts ---------------------------------------------------------------------------------

def test_error_classes_are_data(tmp_path: Path, fakes: dict[str, AnyFake],
                                adapters: Adapters) -> None:
    table = tmp_path / "provider_errors.yaml"
    table.write_text("version: 1\nproviders:\n  twilio:\n    codes: {21610: permanent}\n")
    contract = BY_NAME["twilio_sms"]
    fake = ready(fakes, contract)
    fake.fail("21610")
    result = adapters.build(contract, fake, errors_file=str(table)).send(message(contract))
    assert (result.status, result.error_class) == (SendStatus.FAILED, "permanent")


@pytest.mark.parametrize(("text", "problem"), [
    ("version: 1\nproviders:\n  twilio:\n    codez: {}\n", "codez"),
    ("version: 1\nproviders:\n  twilio:\n    statuses: {6xx: transient}\n", "6xx"),
    ("version: 1\nproviders:\n  twilio:\n    codes: {1: sometimes}\n", "sometimes"),
    ("version: [\n", "YAML"),
])
def test_a_broken_error_table_fails_at_construction(tmp_path: Path, text: str,
                                                    problem: str) -> None:
    table = tmp_path / "provider_errors.yaml"
    table.write_text(text)
    with pytest.raises(ErrorTableError, match=problem):
        load_error_table(table)
    with pytest.raises(ErrorTableError):
        load_adapter("webhook").from_config("webhook", {
            "url": "https://x", "secret": SECRET, "errors_file": str(table)})


def test_the_shipped_error_table_covers_every_adapter() -> None:
    table = load_error_table()
    for provider in ("twilio", "sendgrid", "smtp", "telegram", "webhook"):
        table.rules(provider)
    twilio = table.rules("twilio")
    assert twilio.classify(status=400, code=21610) == "opt_out"
    assert twilio.classify(status=503, code=20503) == "transient"
    assert table.rules("sendgrid").classify(status=502) == "transient"
    with pytest.raises(LookupError, match="known: "):
        table.rules("pigeon")


def test_retry_after_from_headers() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("12", now=now) == 12
    assert retry_after_seconds(None, str(int(now) + 30), now=now) == 30  # epoch reset
    assert retry_after_seconds(None, "45", now=now) == 45  # a delay, not an epoch
    assert retry_after_seconds("Tue, 14 Nov 2023 22:14:20 GMT", now=now) == 60
    assert retry_after_seconds("soon", None, now=now) is None
    assert retry_after_seconds(None, None, now=now) is None


def test_webhook_signature_verification() -> None:
    body = b'{"message_id":1}'
    now = 1_700_000_000.0
    timestamp = str(int(now))
    good = "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()
    assert verify_signature(SECRET, timestamp, body, good, now=now)
    assert verify_signature(SECRET.encode(), timestamp, body, good, now=now + 299)
    assert not verify_signature(SECRET, timestamp, body, good, now=now + 301)  # replayed
    assert not verify_signature(SECRET, timestamp, body + b" ", good, now=now)  # tampered
    assert not verify_signature("another-secret-0123", timestamp, body, good, now=now)
    assert not verify_signature(SECRET, "yesterday", body, good, now=now)
    assert not verify_signature(SECRET, str(int(now) + 1), body, good, now=now)


def test_rate_limiter_buckets_are_per_key() -> None:
    clock = ManualClock()
    limiter = RateLimiter(2, burst=3, clock=clock, sleep=clock.sleep)
    assert [limiter.acquire(("twilio_sms", "+1")) for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire(("twilio_sms", "+2")) == 0  # another sender, another bucket
    assert limiter.acquire(("twilio_sms", "+1")) == pytest.approx(0.5)
    clock.now += 10  # refills up to the burst, not beyond
    assert [limiter.acquire(("twilio_sms", "+1")) for _ in range(4)] == \
        pytest.approx([0, 0, 0, 0.5])
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_rate_limiter_paces_threads() -> None:
    limiter = RateLimiter(50, burst=1)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [limiter.acquire("k") for _ in range(4)])
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 11 / 50 - 0.01  # 12 tokens, the first one free


def test_webhook_payload_is_the_signed_json(fakes: dict[str, AnyFake],
                                            adapters: Adapters) -> None:
    contract = BY_NAME["webhook"]
    fake = ready(fakes, contract)
    adapters.build(contract, fake).send(message(contract, note="ü"))
    rec = fake.requests[0]
    assert isinstance(rec, Recorded)
    assert json.loads(rec.raw)["metadata"]["note"] == "ü"
