"""Limits of the HTTP server against abuse that the framework leaves open.

- :class:`BodyLimit`: request bodies larger than a limit get 413 while they arrive, chunked
  ones included, before anything is parsed.
- :func:`deadline_protocol`: uvicorn times a connection out only between requests, after a
  response; a client trickling its headers (slow-loris) keeps a connection forever. The
  protocol made here closes a connection whose request headers have not all arrived within
  a deadline of its opening or of the previous response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: bodies of requests to ``paths`` may hold at most ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...], setting: str) -> None:
        self.app, self.limit, self.paths, self.setting = app, limit, paths, setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, f"a body of {declared} bytes")
            return
        seen = 0
        too_large = replaced = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise _TooLarge
            return message

        async def checked_send(message: Message) -> None:
            # The framework turns the failed read into its own error reply: send the 413
            # in its place.
            nonlocal replaced
            if not too_large:
                await send(message)
            elif not replaced:
                replaced = True
                await self._refuse(send, f"a body of more than {self.limit} bytes")

        try:
            await self.app(scope, limited_receive, checked_send)
        except _TooLarge:
            if not replaced:
                await self._refuse(send, f"a body of more than {self.limit} bytes")

    async def _refuse(self, send: Send, what: str) -> None:
        message = f"{what} exceeds {self.setting}={self.limit}"
        body = json.dumps({"error": {"code": "RESOURCE_EXHAUSTED", "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose headers are late (slow-loris)."""

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_for: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_for:
                self._disarm()  # a new request's headers have all arrived

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()  # may start a pipelined request already received
            if self.cycle is before and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_for = self.cycle
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                logger.warning(
                    "closed an HTTP connection from %s: no complete request headers within "
                    "%.0f s (ESANS_HTTP_HEADER_TIMEOUT_S)",
                    self.client[0] if self.client else "unknown",
                    header_timeout_s,
                )
                self.transport.close()

    return HeaderDeadlineProtocol
