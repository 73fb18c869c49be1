"""A real local SMTP server (aiosmtpd) that records each message and answers as told.

It offers STARTTLS with a self-signed certificate made for 127.0.0.1 and requires AUTH
(after STARTTLS, as real submission servers do).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["PASSWORD", "USERNAME", "Delivered", "FakeSmtp", "make_certificate"]

USERNAME = "mailer"
PASSWORD = "smtp-5ecret-password"


@dataclass(frozen=True)
class Delivered:
    """One message the server received in full (DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    login: str | None
    tls: bool
    message: EmailMessage = field(repr=False)
    raw: bytes = field(repr=False)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeSmtp:
    """Records every message; `fail("550")` (RCPT), `fail("451")`/`fail("554")` (DATA),
    `delay(s)` and `drop()` act after the message was received."""

    errors = {"550": "rcpt", "451": "data", "554": "data"}
    replies = {"550": "550 5.1.1 Recipient address rejected: User unknown",
               "451": "451 4.3.0 Try again later",
               "554": "554 5.7.1 Message rejected as spam"}

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[Delivered] = []
        self.issued: list[str] = []  # Message-IDs of the messages accepted
        self._lock = threading.Lock()
        self._mode = "ok"
        self._delay = 0.0
        self.cert, self.key = cert, key
        self.controller: Controller | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def reset(self) -> None:
        """Forget recorded messages and answer normally again."""
        with self._lock:
            self.requests.clear()
            self.issued.clear()
            self._mode = "ok"

    def fail(self, name: str) -> None:
        """Refuse with the named reply code."""
        if name not in self.errors:
            raise KeyError(f"FakeSmtp knows no error {name!r}; known: {', '.join(self.errors)}")
        self._mode = name

    def delay(self, seconds: float) -> None:
        """Answer the end of DATA only after `seconds`."""
        self._mode, self._delay = "delay", seconds

    def drop(self) -> None:
        """Close the connection once the message was received, without answering."""
        self._mode = "drop"

    def start(self) -> str:
        """Serve on a free port; the address as host:port."""
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.cert, self.key)
        self.port = _free_port()
        self.controller = Controller(self, hostname=self.host, port=self.port,
                                     server_hostname="fake-smtp.test",
                                     tls_context=tls, require_starttls=True,
                                     auth_required=True, authenticator=self._authenticate)
        self.controller.start()
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving: the port refuses connections from now on."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @staticmethod
    def _authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == USERNAME.encode() \
            and auth_data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.errors.get(self._mode) == "rcpt":
            return self.replies[self._mode]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        login = session.auth_data.login.decode() \
            if isinstance(session.auth_data, LoginPassword) else None
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        delivered = Delivered(str(envelope.mail_from), list(envelope.rcpt_tos), login,
                              session.ssl is not None, parsed, raw)
        with self._lock:
            self.requests.append(delivered)
        mode = self._mode
        if mode == "drop":
            assert server.transport is not None
            server.transport.close()
            return "250 never seen"
        if mode == "delay":
            await asyncio.sleep(self._delay)
        if self.errors.get(mode) == "data":
            return self.replies[mode]
        with self._lock:
            self.issued.append(str(parsed["Message-ID"]).strip("<>"))
        return "250 2.0.0 Ok: queued"


class _QuietDeprecation(logging.Filter):
    """aiosmtpd warns about its own use of `Session.login_data` on every successful AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_QuietDeprecation())
