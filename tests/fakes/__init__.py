"""Local fake providers that the real SDKs talk to over HTTP (and SMTP), one module each.

Every fake records each request it receives and answers as a test tells it:

    normally                  `fake.reset()`
    with a named error        `fake.fail("21610")`; the names are the keys of `fake.errors`
    late                      `fake.delay(seconds)`: after reading the request, so a client
                              read timeout leaves exactly one recorded request
    not at all                `fake.drop()`: closes the connection after reading the request
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes.server import Served, drop_connection, wait_or_disconnect

__all__ = ["Fake", "Recorded", "json_error"]


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any  # JSON or form fields when the content type says so, else the text
    raw: bytes = field(repr=False)


def json_error(status: int, payload: Any, headers: Mapping[str, str] | None = None,
               ) -> Callable[[Recorded], Response]:
    """An error answer, built when it is needed (so time-based headers are fresh)."""
    return lambda _: JSONResponse(payload, status_code=status, headers=dict(headers or {}))


class Fake:
    """The recording and scripting every fake provider shares."""

    errors: ClassVar[dict[str, Callable[[Recorded], Response]]] = {}

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.issued: list[str] = []  # provider message ids handed out, in order
        self._lock = threading.Lock()
        self._mode = "ok"
        self._delay = 0.0
        self.served: Served | None = None

    # scripting -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded requests and answer normally again."""
        with self._lock:
            self.requests.clear()
            self.issued.clear()
            self._mode = "ok"

    def fail(self, name: str) -> None:
        """Answer every request with the named error."""
        if name not in self.errors:
            raise KeyError(f"{type(self).__name__} knows no error {name!r}; "
                           f"known: {', '.join(self.errors)}")
        self._mode = name

    def delay(self, seconds: float) -> None:
        """Read each request, then wait `seconds` (or until the client leaves) before answering."""
        self._mode, self._delay = "delay", seconds

    def drop(self) -> None:
        """Read each request, then close the connection without an answer."""
        self._mode = "drop"

    # serving -------------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a free port; the base URL."""
        self.served = Served(self.app())
        return self.served.url

    def stop(self) -> None:
        """Stop serving: the port refuses connections from now on."""
        if self.served is not None:
            self.served.stop()

    @property
    def url(self) -> str:
        """The base URL while serving."""
        assert self.served is not None, "the fake is not serving"
        return self.served.url

    def app(self) -> Any:
        """The ASGI app; each fake defines its routes."""
        raise NotImplementedError

    def issue(self, provider_id: str) -> str:
        """Remember a provider message id handed out; the id."""
        with self._lock:
            self.issued.append(provider_id)
        return provider_id

    async def record(self, request: Request) -> Recorded:
        """Read and remember `request`."""
        raw = await request.body()
        ctype = request.headers.get("content-type", "")
        body: Any = raw.decode("utf-8", "replace")
        if ctype.startswith("application/json"):
            body = json.loads(raw or b"null")
        elif ctype.startswith("application/x-www-form-urlencoded"):
            body = dict(parse_qsl(body, keep_blank_values=True))
        rec = Recorded(request.method, request.url.path, dict(request.query_params),
                       {k.lower(): v for k, v in request.headers.items()}, body, raw)
        with self._lock:
            self.requests.append(rec)
        return rec

    async def answer(self, request: Request, ok: Callable[[Recorded], Response],
                     authorized: Callable[[Recorded], Response | None] | None = None,
                     ) -> Response:
        """Record `request`, then answer as scripted; `ok` builds the normal answer."""
        rec = await self.record(request)
        mode, delay = self._mode, self._delay
        if mode == "drop":
            await drop_connection(request)
            return Response(status_code=599)  # goes nowhere: the connection is closed
        if mode == "delay":
            await wait_or_disconnect(request, delay)
        denied = authorized(rec) if authorized is not None else None
        if denied is not None:
            return denied
        if mode in self.errors:
            return self.errors[mode](rec)
        return ok(rec)
