"""SMS through Twilio's Messages API, with the official `twilio` SDK.

The SDK's requests-based HTTP client never retries on its own here (no retries are configured
for plain requests), so one `send` is at most one request. Errors arrive as `TwilioRestException`
(or the RFC 9457 `TwilioServiceException`) carrying Twilio's `code`; transport failures as
`requests` exceptions, split into "never connected" (RETRY) and "may have arrived" (UNKNOWN).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from pydantic import Field, SecretStr, field_validator, model_validator
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus
from channels.errors import (
    classified,
    load_error_table,
    not_sent,
    outcome_unknown,
    redact,
    retry_after_seconds,
)
from channels.ratelimit import RateLimiter

__all__ = ["TwilioSettings", "TwilioSmsChannel"]

MESSAGE_ID_PARAM = "touchpoints_message_id"


def _http_url(value: str | None) -> str | None:
    if value is not None and urlsplit(value).scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


class TwilioSettings(ChannelSettings):
    """Twilio credentials, the sender, and pacing for that sender."""

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: SecretStr
    from_number: str | None = Field(default=None, min_length=1)
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    status_callback_base_url: str | None = None
    base_url: str | None = None  # replaces https://api.twilio.com (a proxy, a test server)
    edge: str | None = None
    region: str | None = None
    timeout: float = Field(default=10.0, gt=0)
    # a long code takes about 1 message/s, toll-free 3, a short code 100; None: no pacing
    rate_per_second: float | None = Field(default=1.0, gt=0)
    burst: int = Field(default=1, ge=1)
    # pooled connections to the API: at least the dispatcher's concurrency, or they churn
    max_connections: int = Field(default=128, ge=1)
    errors_file: Path | None = None

    @field_validator("status_callback_base_url", "base_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioSettings:
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of from_number and messaging_service_sid")
        return self


class _RecordingHttpClient(TwilioHttpClient):  # type: ignore[misc]  # the SDK is untyped
    """The SDK's HTTP client, remembering each thread's last response for its headers."""

    def __init__(self, timeout: float, max_connections: int) -> None:
        super().__init__(timeout=timeout)
        self._local = threading.local()
        # the SDK's pool keeps min(32, cpus + 4) connections: too few for a concurrent dispatcher
        for prefix in ("https://", "http://"):
            self.session.mount(prefix, HTTPAdapter(pool_maxsize=max_connections))

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self._local.headers = None
        response = super().request(*args, **kwargs)
        self._local.headers = response.headers
        return response

    def last_header(self, name: str) -> str | None:
        """A header of this thread's last response."""
        headers = getattr(self._local, "headers", None)
        value = None if headers is None else headers.get(name)
        return None if value is None else str(value)

    def close(self) -> None:
        """Close the pooled connections."""
        if self.session is not None:
            self.session.close()


def _never_connected(exc: requests.RequestException) -> bool:
    """True when `exc` happened before a connection existed, so no request left."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.SSLError):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        reason = exc.args[0]
        # refused, unreachable, DNS failure: urllib3 wraps them in ConnectTimeoutError subclasses
        return isinstance(reason, MaxRetryError) and isinstance(reason.reason, ConnectTimeoutError)
    return False


class TwilioSmsChannel(Channel):
    """Text messages through Twilio's Messages API."""

    Settings = TwilioSettings
    kind: ClassVar[str] = "twilio_sms"
    provider: ClassVar[str] = "twilio"

    def __init__(self, name: str, settings: ChannelSettings, *,
                 limiter: RateLimiter | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert isinstance(settings, TwilioSettings)
        super().__init__(name, settings)
        self.settings: TwilioSettings = settings
        self.errors = load_error_table(settings.errors_file).rules(self.provider)
        self.limiter = limiter if limiter is not None or settings.rate_per_second is None \
            else RateLimiter.shared(settings.rate_per_second, settings.burst)
        self.wall_clock = wall_clock
        self._http = _RecordingHttpClient(settings.timeout, settings.max_connections)
        self._client = Client(settings.account_sid, settings.auth_token.get_secret_value(),
                              http_client=self._http, edge=settings.edge, region=settings.region)
        # explicit settings only: TWILIO_EDGE / TWILIO_REGION in the environment do not apply
        self._client.edge, self._client.region = settings.edge, settings.region
        if settings.base_url is not None:
            self._client.api.base_url = settings.base_url.rstrip("/")

    def address(self, number: str) -> str:
        """A phone number as this channel's `To`/`From` expects it."""
        return number

    def status_callback(self, message: OutgoingMessage) -> str | None:
        """The status callback URL for `message`, carrying our message id."""
        base = self.settings.status_callback_base_url
        if base is None:
            return None
        parts = urlsplit(base)
        query = [*parse_qsl(parts.query, keep_blank_values=True),
                 (MESSAGE_ID_PARAM, str(message.message_id))]
        return urlunsplit(parts._replace(query=urlencode(query)))

    def send(self, message: OutgoingMessage) -> SendResult:
        """Create one Twilio message; SENT carries its SID."""
        s = self.settings
        if self.limiter is not None:
            self.limiter.acquire((self.kind, s.from_number or s.messaging_service_sid))
        params: dict[str, Any] = {"to": self.address(message.recipient), "body": message.body}
        if s.from_number is not None:
            params["from_"] = self.address(s.from_number)
        else:
            params["messaging_service_sid"] = s.messaging_service_sid
        callback = self.status_callback(message)
        if callback is not None:
            params["status_callback"] = callback
        try:
            created = self._client.messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as exc:
            return self._error_answer(exc)
        except requests.RequestException as exc:
            detail = self._clean(f"{type(exc).__name__}: {exc}")
            return not_sent(detail) if _never_connected(exc) else outcome_unknown(detail)
        return SendResult(SendStatus.SENT, provider_message_id=str(created.sid))

    def _error_answer(self, exc: TwilioRestException | TwilioServiceException) -> SendResult:
        status = int(exc.status)
        code = int(exc.code) if exc.code is not None else None
        if isinstance(exc, TwilioServiceException):
            text = f"{exc.title}: {exc.detail}" if exc.detail else str(exc.title)
        else:
            text = str(exc.msg)
        error_class = self.errors.classify(status=status, code=code, description=text)
        retry_after = retry_after_seconds(self._http.last_header("Retry-After"),
                                          now=self.wall_clock())
        detail = f"twilio {code} (HTTP {status}): {text}" if code is not None \
            else f"twilio HTTP {status}: {text}"
        return classified(error_class, self._clean(detail), retry_after=retry_after)

    def _clean(self, text: str) -> str:
        return redact(text, self.settings.auth_token.get_secret_value())

    def close(self) -> None:
        """Close the SDK's pooled connections."""
        self._http.close()
