"""Email over SMTP with the standard library, and the email basics SendGrid shares.

One connection per message, each step of the dialogue checked on its own: any failure before
the message body was handed over (connect, TLS, login, MAIL, RCPT) leaves nothing accepted and
is safe to retry; a lost connection or timeout once DATA has begun is UNKNOWN, because the
server may have queued the message before its answer was lost.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import ssl
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from channels.base import Channel, ChannelSettings, OutgoingMessage, SendResult, SendStatus
from channels.errors import (
    ErrorClass,
    classified,
    load_error_table,
    not_sent,
    outcome_unknown,
    redact,
)
from channels.ratelimit import RateLimiter

__all__ = [
    "SmtpChannel",
    "SmtpSettings",
    "check_unsubscribe_template",
    "default_subject",
    "is_email",
    "unsubscribe_url",
    "valid_email",
]

SUBJECT_MAX = 78
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def is_email(value: str) -> bool:
    """True when `value` looks like an ASCII email address."""
    return value.isascii() and _EMAIL.fullmatch(value) is not None


def valid_email(value: str) -> str:
    """`value` if it looks like an email address, else ValueError."""
    if not is_email(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


def default_subject(body: str) -> str:
    """A subject for a message rendered without one: its first line, shortened."""
    first = next((line.strip() for line in body.splitlines() if line.strip()), "")
    if len(first) > SUBJECT_MAX:
        first = first[:SUBJECT_MAX - 3].rstrip() + "..."
    return first or "(no subject)"


def unsubscribe_url(message: OutgoingMessage, template: str | None) -> str | None:
    """The message's own `unsubscribe_url` metadata, else `template` filled in, else None."""
    url = message.metadata.get("unsubscribe_url")
    if url:
        return str(url)
    if template is None:
        return None
    return template.format(message_id=message.message_id, channel=message.channel,
                           trigger_id=message.trigger_id,
                           customer_external_id=message.customer_external_id)


def check_unsubscribe_template(value: str | None) -> str | None:
    """`value` if it only uses the placeholders `unsubscribe_url` fills in."""
    if value is not None:
        try:
            value.format(message_id=0, channel="", trigger_id="", customer_external_id="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad placeholder {exc} in unsubscribe_url_template; use "
                             "{message_id}, {channel}, {trigger_id}, {customer_external_id}"
                             ) from None
    return value


class SmtpSettings(ChannelSettings):
    """The SMTP server, its credentials and the sender."""

    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True
    ca_file: Path | None = None  # trust this CA for STARTTLS besides the system's
    timeout: float = Field(default=10.0, gt=0)
    from_email: str
    from_name: str | None = None
    local_hostname: str | None = None
    unsubscribe_url_template: str | None = None
    rate_per_second: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)
    errors_file: Path | None = None

    @field_validator("from_email")
    @classmethod
    def _from(cls, value: str) -> str:
        return valid_email(value)

    @field_validator("unsubscribe_url_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return check_unsubscribe_template(value)

    @model_validator(mode="after")
    def _credentials(self) -> SmtpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        return self


def _reply(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


class SmtpChannel(Channel):
    """Email through an SMTP server; SENT carries the Message-ID we generated."""

    Settings = SmtpSettings
    kind: ClassVar[str] = "smtp"

    def __init__(self, name: str, settings: ChannelSettings, *,
                 limiter: RateLimiter | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        assert isinstance(settings, SmtpSettings)
        super().__init__(name, settings)
        self.settings: SmtpSettings = settings
        self.errors = load_error_table(settings.errors_file).rules(self.kind)
        self.limiter = limiter if limiter is not None or settings.rate_per_second is None \
            else RateLimiter.shared(settings.rate_per_second, settings.burst)
        self.wall_clock = wall_clock
        self._tls = ssl.create_default_context(
            cafile=None if settings.ca_file is None else str(settings.ca_file))

    def email(self, message: OutgoingMessage) -> EmailMessage:
        """The MIME message for `message`."""
        s = self.settings
        mail = EmailMessage(policy=policy.SMTP)
        mail["From"] = formataddr((s.from_name, s.from_email)) if s.from_name else s.from_email
        mail["To"] = message.recipient
        mail["Subject"] = message.subject or default_subject(message.body)
        mail["Date"] = formatdate(self.wall_clock(), localtime=False)
        mail["Message-ID"] = make_msgid(f"tp{message.message_id}",
                                        domain=s.from_email.rpartition("@")[2])
        mail["X-Touchpoints-Message-Id"] = str(message.message_id)
        url = unsubscribe_url(message, s.unsubscribe_url_template)
        if url is not None:
            mail["List-Unsubscribe"] = f"<{url}>"
            mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        mail.set_content(message.body, cte="quoted-printable")
        return mail

    def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver one message to the SMTP server."""
        s = self.settings
        if not is_email(message.recipient):
            return classified(ErrorClass.INVALID_RECIPIENT,
                              f"smtp: {message.recipient!r} is not an ASCII email address")
        if self.limiter is not None:
            self.limiter.acquire((self.kind, s.from_email))
        try:
            mail = self.email(message)
            payload = mail.as_bytes()
        except ValueError as exc:  # e.g. a line break in the subject
            return classified(ErrorClass.PERMANENT, f"smtp: cannot build the message: {exc}")
        smtp: smtplib.SMTP | None = None
        data_started = False
        try:
            try:
                # the host given here is also the name STARTTLS checks the certificate against
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout,
                                    local_hostname=s.local_hostname)
                smtp.ehlo()
                if s.starttls:
                    smtp.starttls(context=self._tls)
                    smtp.ehlo()
                if s.username is not None and s.password is not None:
                    smtp.login(s.username, s.password.get_secret_value())
                code, text = smtp.mail(s.from_email)
                if code != 250:
                    return self._refused(code, _reply(text))
                code, text = smtp.rcpt(message.recipient)
                if code not in (250, 251):
                    return self._refused(code, _reply(text), recipient=True)
                data_started = True
                code, text = smtp.data(payload)
                if code != 250:
                    return self._refused(code, _reply(text))
            except smtplib.SMTPResponseException as exc:  # greeting, STARTTLS, AUTH, DATA
                return self._refused(exc.smtp_code, _reply(exc.smtp_error))
            except smtplib.SMTPServerDisconnected as exc:
                return self._lost(exc, data_started)
            except smtplib.SMTPException as exc:  # no STARTTLS, no usable AUTH: configuration
                return classified(ErrorClass.PERMANENT, self._clean(f"smtp: {exc}"))
            except OSError as exc:  # refused, timeouts, resets, TLS
                return self._lost(exc, data_started)
            # the message was accepted; a failed goodbye changes nothing
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
            return SendResult(SendStatus.SENT,
                              provider_message_id=str(mail["Message-ID"]).strip("<>"))
        finally:
            if smtp is not None:
                smtp.close()

    def _lost(self, exc: Exception, data_started: bool) -> SendResult:
        detail = self._clean(f"smtp {type(exc).__name__}: {exc}")
        return outcome_unknown(detail) if data_started else not_sent(detail)

    def _refused(self, code: int, text: str, *, recipient: bool = False) -> SendResult:
        error_class = self.errors.classify(status=code, code=code if recipient else None,
                                           description=text)
        step = "recipient refused" if recipient else "refused"
        return classified(error_class, self._clean(f"smtp {code} {step}: {text}"))

    def _clean(self, text: str) -> str:
        password = self.settings.password
        return redact(text, None if password is None else password.get_secret_value())
