"""Serve an ASGI app with uvicorn on 127.0.0.1 in a background thread, for real-HTTP tests.

`Served.drop` closes one client's connection without an answer: an app calls
`await drop_connection(request)` after reading the request, which the SDKs see as a remote
disconnect after the request left.

`Served(app, sock=listening_socket)` serves on a socket made elsewhere: several processes given
the same listening socket share its connections (the benchmark's fakes do, so that one process's
GIL does not cap what the fake can answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["Served", "drop_connection", "wait_or_disconnect"]

DROP_KEY = "tests.fakes.drop"


class Served:
    """`app` listening on a free port of 127.0.0.1 until `stop` (or the end of a with block)."""

    def __init__(self, app: ASGIApp, *, sock: socket.socket | None = None) -> None:
        self.app = app
        config = uvicorn.Config(self._asgi, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", interface="asgi3", http="h11", ws="none",
                                loop="asyncio", proxy_headers=False,
                                timeout_graceful_shutdown=1, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="fake-provider", daemon=True,
                                       args=(None if sock is None else [sock],))
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake provider server did not start")
            time.sleep(0.005)
        bound = sock if sock is not None else self.server.servers[0].sockets[0]
        self.port: int = bound.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = tuple(scope["client"]) if scope.get("client") else None
            scope[DROP_KEY] = lambda: self._drop(client)
        await self.app(scope, receive, send)

    def _drop(self, client: tuple[Any, ...] | None) -> None:
        for connection in list(self.server.server_state.connections):
            if getattr(connection, "client", None) == client:
                connection.transport.close()

    def stop(self) -> None:
        """Stop serving; afterwards the port refuses connections."""
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def drop_connection(request: Request) -> None:
    """Close the connection `request` came on, without answering."""
    drop: Callable[[], None] = request.scope[DROP_KEY]
    drop()
    await wait_or_disconnect(request, 5.0)


async def wait_or_disconnect(request: Request, seconds: float) -> None:
    """Sleep `seconds`, or less if the client goes away first (so shutdown is quick)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), seconds)
