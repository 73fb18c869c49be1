"""Chat messages through the Telegram Bot API (`sendMessage`) over httpx.

The bot token is part of every request path, so it is kept out of error text (`redact`) and out
of httpx's request log (a filter on the `httpx` logger).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, SecretStr, field_validator

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus
from channels.errors import (
    HTTPX_NEVER_SENT,
    ErrorClass,
    classified,
    load_error_table,
    not_sent,
    outcome_unknown,
    redact,
    redact_logger,
    retry_after_seconds,
)
from channels.ratelimit import RateLimiter

__all__ = ["TelegramChannel", "TelegramSettings"]

MAX_TEXT = 4096

redact_logger("httpx", re.compile(r"/bot[^/\s]+/"), "/bot***/")


class TelegramSettings(ChannelSettings):
    """The bot's token and where the Bot API lives."""

    bot_token: SecretStr
    api_base: str = "https://api.telegram.org"
    timeout: float = Field(default=10.0, gt=0)
    parse_mode: Literal["HTML", "MarkdownV2"] | None = None
    disable_web_page_preview: bool = False
    # Telegram allows a bot about 30 messages a second overall
    rate_per_second: float | None = Field(default=30.0, gt=0)
    burst: int = Field(default=1, ge=1)
    errors_file: Path | None = None

    @field_validator("bot_token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(r"\d+:[A-Za-z0-9_-]+", value.get_secret_value()):
            raise ValueError("bot_token is not of the form <bot id>:<secret>")
        return value


class TelegramChannel(Channel):
    """Messages from a Telegram bot to a chat id."""

    Settings = TelegramSettings
    kind: ClassVar[str] = "telegram"

    def __init__(self, name: str, settings: ChannelSettings, *,
                 limiter: RateLimiter | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert isinstance(settings, TelegramSettings)
        super().__init__(name, settings)
        self.settings: TelegramSettings = settings
        self.errors = load_error_table(settings.errors_file).rules(self.kind)
        self.limiter = limiter if limiter is not None or settings.rate_per_second is None \
            else RateLimiter.shared(settings.rate_per_second, settings.burst)
        self.wall_clock = wall_clock
        token = settings.bot_token.get_secret_value()
        self._bot_id = token.partition(":")[0]  # public: the bot's user id
        self._url = f"{settings.api_base.rstrip('/')}/bot{token}/sendMessage"
        # One client per sending thread: a shared httpx pool under many threads closed
        # connections that another thread was reading ("Bad file descriptor" -> UNKNOWN).
        self._local = threading.local()
        self._ssl = httpx.create_ssl_context()  # loading CA certificates is costly: once
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()

    @property
    def _http(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(timeout=self.settings.timeout, verify=self._ssl)
            with self._clients_lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def send(self, message: OutgoingMessage) -> SendResult:
        """Call `sendMessage`; SENT carries Telegram's message id."""
        s = self.settings
        if len(message.body) > MAX_TEXT:
            return classified(ErrorClass.PERMANENT,
                              f"telegram: text of {len(message.body)} characters exceeds "
                              f"{MAX_TEXT}")
        if self.limiter is not None:
            self.limiter.acquire((self.kind, self._bot_id))
        payload: dict[str, Any] = {"chat_id": message.recipient, "text": message.body}
        if s.parse_mode is not None:
            payload["parse_mode"] = s.parse_mode
        if s.disable_web_page_preview:
            payload["link_preview_options"] = {"is_disabled": True}
        try:
            response = self._http.post(self._url, json=payload)
        except HTTPX_NEVER_SENT as exc:
            return not_sent(self._clean(f"{type(exc).__name__}: {exc}"))
        except httpx.HTTPError as exc:  # read timeout, connection closed after sending
            return outcome_unknown(self._clean(f"{type(exc).__name__}: {exc}"))
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {}
        if response.is_success and answer.get("ok") is True:
            result = answer.get("result") or {}
            message_id = result.get("message_id") if isinstance(result, dict) else None
            return SendResult(SendStatus.SENT,
                              provider_message_id=None if message_id is None else str(message_id))
        return self._error_answer(response, answer)

    def _error_answer(self, response: httpx.Response, answer: dict[str, Any]) -> SendResult:
        code = answer.get("error_code")
        status = code if isinstance(code, int) else response.status_code
        description = str(answer.get("description") or response.reason_phrase)
        error_class = self.errors.classify(status=status, description=description)
        parameters = answer.get("parameters")
        hint = parameters.get("retry_after") if isinstance(parameters, dict) else None
        retry_after = retry_after_seconds(
            str(hint) if hint is not None else response.headers.get("Retry-After"),
            now=self.wall_clock())
        return classified(error_class, self._clean(f"telegram {status}: {description}"),
                          retry_after=retry_after)

    def _clean(self, text: str) -> str:
        return redact(text, self.settings.bot_token.get_secret_value())

    def close(self) -> None:
        """Close every thread's connections."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
