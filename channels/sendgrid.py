"""Email through SendGrid's v3 Mail Send API, with the official `sendgrid` SDK.

The SDK sends with `python_http_client` over urllib: error answers arrive as its `HTTPError`
subclasses (status, body, headers); a failure while the request is being written arrives as
`urllib.error.URLError` (not sent), one while waiting for the answer as a bare `TimeoutError`
or `http.client` disconnect (the request may have arrived).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from python_http_client.exceptions import HTTPError as SendGridHTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, Email, Header, Mail, To

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus
from channels.errors import (
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
from channels.smtp import (
    check_unsubscribe_template,
    default_subject,
    is_email,
    unsubscribe_url,
    valid_email,
)

__all__ = ["SendGridChannel", "SendGridSettings"]

MESSAGE_ID_ARG = "touchpoints_message_id"

# python_http_client logs every request's headers, bearer token included, at DEBUG
redact_logger("python_http_client.client", re.compile(r"Bearer [^'\",}\s]+"), "Bearer ***")


class SendGridSettings(ChannelSettings):
    """SendGrid API key, sender, and how unsubscribe links are made."""

    api_key: SecretStr
    from_email: str
    from_name: str | None = None
    host: str = "https://api.sendgrid.com"
    timeout: float = Field(default=10.0, gt=0)
    unsubscribe_url_template: str | None = None
    rate_per_second: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)
    errors_file: Path | None = None
    # the Event Webhook's verification key (base64 DER, as SendGrid shows it; PEM also works)
    # and how old a signed batch may be; read by engine.webhooks, not for sending
    event_webhook_public_key: str | None = None
    event_webhook_max_age: float = Field(default=300.0, gt=0)

    @field_validator("from_email")
    @classmethod
    def _from(cls, value: str) -> str:
        return valid_email(value)

    @field_validator("unsubscribe_url_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return check_unsubscribe_template(value)


def _never_connected(exc: urllib.error.URLError) -> bool:
    # urllib raises URLError only while connecting and writing the request
    reason = exc.reason
    return isinstance(reason, ConnectionRefusedError | socket.gaierror | TimeoutError
                      | ssl.SSLError)


class SendGridChannel(Channel):
    """Email through SendGrid; our message id travels in `custom_args`."""

    Settings = SendGridSettings
    kind: ClassVar[str] = "sendgrid"

    def __init__(self, name: str, settings: ChannelSettings, *,
                 limiter: RateLimiter | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert isinstance(settings, SendGridSettings)
        super().__init__(name, settings)
        self.settings: SendGridSettings = settings
        self.errors = load_error_table(settings.errors_file).rules(self.kind)
        self.limiter = limiter if limiter is not None or settings.rate_per_second is None \
            else RateLimiter.shared(settings.rate_per_second, settings.burst)
        self.wall_clock = wall_clock
        self._client = SendGridAPIClient(settings.api_key.get_secret_value(),
                                         host=settings.host.rstrip("/"))
        self._client.client.timeout = settings.timeout

    def mail(self, message: OutgoingMessage) -> Mail:
        """The SendGrid mail for `message`."""
        s = self.settings
        mail = Mail(from_email=Email(s.from_email, s.from_name),
                    to_emails=To(message.recipient),
                    subject=message.subject or default_subject(message.body),
                    plain_text_content=message.body)
        mail.custom_arg = CustomArg(MESSAGE_ID_ARG, str(message.message_id))
        if message.trigger_id:
            mail.custom_arg = CustomArg("touchpoints_trigger_id", message.trigger_id)
        url = unsubscribe_url(message, s.unsubscribe_url_template)
        if url is not None:
            mail.header = [Header("List-Unsubscribe", f"<{url}>"),
                           Header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
        return mail

    def send(self, message: OutgoingMessage) -> SendResult:
        """Post one mail; SENT carries SendGrid's `X-Message-Id`."""
        if not is_email(message.recipient):
            return classified(ErrorClass.INVALID_RECIPIENT,
                              f"sendgrid: {message.recipient!r} is not an email address")
        if self.limiter is not None:
            self.limiter.acquire((self.kind, self.settings.from_email))
        mail = self.mail(message)
        try:
            response = self._client.send(mail)
        except SendGridHTTPError as exc:
            return self._error_answer(exc)
        except urllib.error.URLError as exc:
            detail = self._clean(f"{type(exc).__name__}: {exc.reason}")
            return not_sent(detail) if _never_connected(exc) else outcome_unknown(detail)
        except (OSError, http.client.HTTPException) as exc:
            # while waiting for the answer: read timeout, connection reset or closed
            return outcome_unknown(self._clean(f"{type(exc).__name__}: {exc}"))
        provider_id = response.headers.get("X-Message-Id")
        return SendResult(SendStatus.SENT,
                          provider_message_id=None if provider_id is None else str(provider_id))

    def _error_answer(self, exc: SendGridHTTPError) -> SendResult:
        context = exc.__context__
        if isinstance(context, urllib.error.HTTPError):
            context.close()
        status = int(exc.status_code)
        text = _error_text(exc.body) or str(exc.reason)
        error_class = self.errors.classify(status=status, description=text)
        headers = exc.headers
        retry_after = retry_after_seconds(
            None if headers is None else headers.get("Retry-After"),
            None if headers is None else headers.get("X-RateLimit-Reset"),
            now=self.wall_clock())
        return classified(error_class, self._clean(f"sendgrid HTTP {status}: {text}"),
                          retry_after=retry_after)

    def _clean(self, text: str) -> str:
        return redact(text, self.settings.api_key.get_secret_value())


def _error_text(body: Any) -> str:
    """The messages of a SendGrid error body (`{"errors": [{"message": ...}]}`)."""
    try:
        data = json.loads(body)
        return "; ".join(str(e.get("message", "")) for e in data.get("errors", [])
                         if isinstance(e, dict))
    except (TypeError, ValueError, AttributeError):
        return body.decode("utf-8", "replace") if isinstance(body, bytes) else ""
