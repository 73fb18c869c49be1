"""Unsubscribe links for email: a signed token per (customer, channel), a confirm page, one click.

    GET  /unsubscribe/{token}    a small page asking to confirm, with a button that POSTs back;
                                 changes nothing (mail scanners open every link)
    POST /unsubscribe/{token}    withdraws marketing consent on the token's channel and says so;
                                 also the RFC 8058 one-click POST a mail client sends for the
                                 `List-Unsubscribe-Post: List-Unsubscribe=One-Click` header

A token is `<payload>.<mac>`: the payload is `<customer id>.<channel>`, the mac its HMAC-SHA256
under `TOUCHPOINTS_UNSUBSCRIBE_SECRET`, both base64url. Tokens do not expire: the link in an old
email must keep working. A token that does not verify, or names no customer, gets 404 and changes
nothing; a second unsubscribe appends nothing (the latest entry already withdraws consent).

The dispatcher puts `<TOUCHPOINTS_PUBLIC_URL>/unsubscribe/<token>` in every email's metadata
(`unsubscribe_url`), which the email adapters turn into `List-Unsubscribe` headers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import SecretStr
from sqlalchemy import func, insert, select

from engine.config import ChannelsFile
from engine.models import ConsentEntry, Customer, table
from engine.settings import Settings

if TYPE_CHECKING:
    from engine.runtime import Runtime

__all__ = [
    "PREFIX",
    "UnsubscribeLinks",
    "UrlBuilder",
    "make_unsubscribe_router",
    "unsubscribe",
    "unsubscribe_url_builder",
]

PREFIX = "/unsubscribe/"
MIN_SECRET = 16
_DOMAIN = b"touchpoints/unsubscribe/v1\n"  # so the mac is of nothing but an unsubscribe token
_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Robots-Tag": "noindex"}

UrlBuilder = Callable[[int, str], "str | None"]
"""(customer id, channel) -> the unsubscribe URL for a message on that channel, or None."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UnsubscribeLinks:
    """Signs and reads unsubscribe tokens; makes their URLs under `public_url`."""

    def __init__(self, secret: SecretStr, public_url: str | None = None) -> None:
        if len(secret.get_secret_value()) < MIN_SECRET:
            raise ValueError(f"the unsubscribe secret must have at least {MIN_SECRET} characters")
        self._key = secret.get_secret_value().encode("utf-8")
        self.public_url = None if public_url is None else public_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> UnsubscribeLinks | None:
        """From `TOUCHPOINTS_UNSUBSCRIBE_SECRET` and `TOUCHPOINTS_PUBLIC_URL`; None without a
        secret."""
        if settings.unsubscribe_secret is None:
            return None
        return cls(settings.unsubscribe_secret, settings.public_url)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, _DOMAIN + payload.encode("ascii"), hashlib.sha256)
                    .digest())

    def token(self, customer_id: int, channel: str) -> str:
        """The token of `customer_id`'s link for `channel`."""
        payload = _b64(f"{customer_id}.{channel}".encode())
        return f"{payload}.{self._mac(payload)}"

    def url(self, customer_id: int, channel: str) -> str:
        """The link itself; ValueError without a public URL."""
        if self.public_url is None:
            raise ValueError("unsubscribe links need TOUCHPOINTS_PUBLIC_URL")
        return f"{self.public_url}{PREFIX}{self.token(customer_id, channel)}"

    def read(self, token: str) -> tuple[int, str] | None:
        """(customer id, channel) of a genuine token; None for anything else."""
        payload, dot, mac = token.partition(".")
        if not dot or not payload.isascii() or not mac.isascii():
            return None
        if not hmac.compare_digest(mac.encode("ascii"), self._mac(payload).encode("ascii")):
            return None
        try:
            cid, _, channel = _unb64(payload).decode("utf-8").partition(".")
        except (ValueError, binascii.Error):
            return None
        if not cid.isdigit() or not channel:
            return None
        return int(cid), channel


def unsubscribe_url_builder(settings: Settings, channels: ChannelsFile) -> UrlBuilder | None:
    """The dispatcher's link maker: a URL for the email channels (contact `email`); None when
    the secret or the public URL is not set."""
    links = UnsubscribeLinks.from_settings(settings)
    if links is None or links.public_url is None:
        return None
    email = frozenset(name for name, ch in channels.channels.items() if ch.contact == "email")
    return lambda customer_id, channel: (links.url(customer_id, channel) if channel in email
                                         else None)


def unsubscribe(runtime: Runtime, customer_id: int, channel: str, source: str) -> bool | None:
    """Withdraw the customer's marketing consent on `channel`: True when appended, False when
    already withdrawn, None when there is no such customer."""
    c, cl = table(Customer), table(ConsentEntry)
    with runtime.engine.begin() as conn:
        if conn.execute(select(c.c.id).where(c.c.id == customer_id)).first() is None:
            return None
        latest = conn.execute(
            select(cl.c.granted).where(cl.c.id == select(func.max(cl.c.id)).where(
                cl.c.customer_id == customer_id, cl.c.channel == channel,
                cl.c.purpose == "marketing").scalar_subquery())).scalar()
        if latest is False:
            return False
        conn.execute(insert(ConsentEntry).values(
            customer_id=customer_id, channel=channel, purpose="marketing", granted=False,
            occurred_at=runtime.clock.now(), source=source[:64]))
    return True


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<meta name=\"robots\" content=\"noindex\"><title>{html.escape(title)}</title></head>"
        f"<body style=\"font-family: sans-serif; max-width: 32em; margin: 3em auto\">{body}"
        "</body></html>", headers=_HEADERS)


def make_unsubscribe_router(runtime: Runtime, links: UnsubscribeLinks | None = None,
                            ) -> APIRouter:
    """The unsubscribe pages over `runtime`; the links default to its settings'."""
    links = links or UnsubscribeLinks.from_settings(runtime.settings)
    club = html.escape(runtime.config.club.name)
    api = APIRouter(prefix=PREFIX.rstrip("/"), tags=["unsubscribe"])

    def target(token: str) -> tuple[int, str]:
        found = None if links is None else links.read(token)
        if found is None:
            raise HTTPException(404, "unknown unsubscribe link")
        return found

    @api.get("/{token}", include_in_schema=False)
    def confirm(token: str) -> HTMLResponse:
        _, channel = target(token)
        # no lookup here: the page is the same for every genuine token
        return _page(f"Unsubscribe from {runtime.config.club.name}",
                     f"<h1>Unsubscribe</h1><p>Stop marketing messages from {club} on "
                     f"{html.escape(channel)}?</p><form method=\"post\">"
                     "<input type=\"hidden\" name=\"confirm\" value=\"yes\">"
                     "<button type=\"submit\">Unsubscribe</button></form>")

    @api.post("/{token}", include_in_schema=False)
    async def confirmed(token: str, request: Request) -> HTMLResponse:
        customer_id, channel = target(token)
        # parsed here: Starlette's form parser needs python-multipart, which we do not depend on
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        how = "one-click" if form.get("List-Unsubscribe") == "One-Click" else "link"
        if unsubscribe(runtime, customer_id, channel, f"unsubscribe:{how}") is None:
            raise HTTPException(404, "unknown unsubscribe link")
        return _page("Unsubscribed", f"<h1>You are unsubscribed</h1><p>{club} will send you no "
                                     f"more marketing messages on {html.escape(channel)}.</p>")

    return api
