"""Messages as signed JSON POSTs to a URL of the club's own, over httpx.

The receiver checks `X-Touchpoints-Signature: sha256=<hex>`, an HMAC-SHA256 with the shared
secret over `<X-Touchpoints-Timestamp>.<raw body>`, and rejects old timestamps so a captured
request cannot be replayed; `verify_signature` does both. `X-Touchpoints-Message-Id` lets the
receiver drop a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus
from channels.errors import (
    HTTPX_NEVER_SENT,
    classified,
    load_error_table,
    not_sent,
    outcome_unknown,
    redact,
    retry_after_seconds,
)
from channels.ratelimit import RateLimiter

__all__ = [
    "MESSAGE_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookChannel",
    "WebhookSettings",
    "sign",
    "verify_signature",
]

TIMESTAMP_HEADER = "X-Touchpoints-Timestamp"
SIGNATURE_HEADER = "X-Touchpoints-Signature"
MESSAGE_ID_HEADER = "X-Touchpoints-Message-Id"
_RESERVED = {h.lower() for h in (TIMESTAMP_HEADER, SIGNATURE_HEADER, MESSAGE_ID_HEADER,
                                 "content-type", "content-length", "host")}


def _key(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(secret: str | bytes | SecretStr, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`: `sha256=<hex>`."""
    mac = hmac.new(_key(secret), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str | bytes | SecretStr, timestamp: str, body: bytes,
                     signature: str, tolerance: float = 300.0,
                     now: float | None = None) -> bool:
    """True when `signature` signs `body` at `timestamp`, no more than `tolerance` s from now."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, str(sent_at), body), signature.strip())


class WebhookSettings(ChannelSettings):
    """Where to POST and the secret that signs each request."""

    url: str
    secret: SecretStr = Field(min_length=16)
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0)
    rate_per_second: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)
    errors_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        clash = sorted(k for k in value if k.lower() in _RESERVED)
        if clash:
            raise ValueError(f"headers set by the channel itself: {', '.join(clash)}")
        return value


class WebhookChannel(Channel):
    """Each message as one signed JSON POST."""

    Settings = WebhookSettings
    kind: ClassVar[str] = "webhook"

    def __init__(self, name: str, settings: ChannelSettings, *,
                 limiter: RateLimiter | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert isinstance(settings, WebhookSettings)
        super().__init__(name, settings)
        self.settings: WebhookSettings = settings
        self.errors = load_error_table(settings.errors_file).rules(self.kind)
        self.limiter = limiter if limiter is not None or settings.rate_per_second is None \
            else RateLimiter.shared(settings.rate_per_second, settings.burst)
        self.wall_clock = wall_clock
        self._http = httpx.Client(timeout=settings.timeout)

    @staticmethod
    def payload(message: OutgoingMessage) -> dict[str, Any]:
        """The JSON document posted for `message`."""
        return {"message_id": message.message_id, "channel": message.channel,
                "recipient": message.recipient, "subject": message.subject,
                "body": message.body, "trigger_id": message.trigger_id,
                "customer_external_id": message.customer_external_id,
                "metadata": message.metadata}

    def send(self, message: OutgoingMessage) -> SendResult:
        """POST one message; SENT carries the receiver's `id`, if it answers one."""
        s = self.settings
        if self.limiter is not None:
            self.limiter.acquire((self.kind, s.url))
        body = json.dumps(self.payload(message), ensure_ascii=False, sort_keys=True,
                          separators=(",", ":"), default=str).encode("utf-8")
        timestamp = str(int(self.wall_clock()))
        headers = {**s.headers, "Content-Type": "application/json",
                   TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(s.secret, timestamp, body),
                   MESSAGE_ID_HEADER: str(message.message_id)}
        try:
            response = self._http.post(s.url, content=body, headers=headers)
        except HTTPX_NEVER_SENT as exc:
            return not_sent(self._clean(f"{type(exc).__name__}: {exc}"))
        except httpx.HTTPError as exc:  # read timeout, connection closed after sending
            return outcome_unknown(self._clean(f"{type(exc).__name__}: {exc}"))
        if response.is_success:
            return SendResult(SendStatus.SENT, provider_message_id=_answer_id(response))
        error_class = self.errors.classify(status=response.status_code)
        retry_after = retry_after_seconds(response.headers.get("Retry-After"),
                                          now=self.wall_clock())
        text = response.text[:200] or response.reason_phrase
        return classified(error_class,
                          self._clean(f"webhook HTTP {response.status_code}: {text}"),
                          retry_after=retry_after)

    def _clean(self, text: str) -> str:
        return redact(text, self.settings.secret.get_secret_value())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def _answer_id(response: httpx.Response) -> str | None:
    try:
        answer = response.json()
    except ValueError:
        return None
    if isinstance(answer, dict):
        for key in ("id", "message_id"):
            if answer.get(key) is not None:
                return str(answer[key])
    return None
