"""A small async client for Dubhe's WebSocket chat (``/v1/ws/chat``), on ``websockets``.

::

    from dubhe.client.ws import ChatSocket

    async with ChatSocket.connect("ws://127.0.0.1:8000/v1/ws/chat", api_key=key) as socket:
        stream = await socket.create(model="dubhe-fast",
                                     messages=[{"role": "user", "content": "Hello!"}])
        async for chunk in stream:
            print(chunk["choices"][0]["delta"].get("content") or "", end="")
        print(stream.done["usage"])

Several streams may run at once on one socket; each ``create`` gets its own ``request_id``
(chosen here unless given). A request that ends with an ``error`` event raises ``ChatSocketError``
(with the HTTP-equivalent ``status`` and the OpenAI error object) from its stream; the socket stays
open. A closed socket raises ``websockets.ConnectionClosed`` from every stream still open.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = ["SUBPROTOCOL", "ChatSocket", "ChatSocketError", "ChatStream"]

SUBPROTOCOL = "dubhe.chat.v1"


class ChatSocketError(Exception):
    """The server ended one request with an ``error`` event."""

    def __init__(self, event: dict[str, Any]) -> None:
        error = event.get("error") or {}
        super().__init__(f"{event.get('status')} {error.get('code')}: {error.get('message')}")
        self.event = event
        self.status: int | None = event.get("status")
        self.code: str | None = error.get("code")
        self.error: dict[str, Any] = error


class ChatStream:
    """One request's chunks, as an async iterator; ``done`` holds its ``chat.completion.done``
    event (usage, cost, the server's request id) once the iteration has ended."""

    def __init__(self, socket: ChatSocket, request_id: str) -> None:
        self.request_id = request_id
        self.done: dict[str, Any] | None = None
        self._socket = socket
        self._events: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        while self.done is None:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            kind = event.get("type")
            if kind == "chat.completion.chunk":
                yield event
            elif kind == "chat.completion.done":
                self.done = event
            elif kind == "error":
                raise ChatSocketError(event)

    async def cancel(self) -> None:
        """Stop generation; the stream still ends with a done event (what was charged)."""
        await self._socket.cancel(self.request_id)


class ChatSocket:
    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._streams: dict[str, ChatStream] = {}
        self._pongs: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    def connect(cls, url: str, *, api_key: str, **options: Any) -> _Connecting:
        """Open the socket (``async with``); ``options`` go to ``websockets``' ``connect``."""
        return _Connecting(url, api_key, options)

    async def create(self, *, request_id: str | None = None, **body: Any) -> ChatStream:
        """Send ``chat.completion.create`` with ``body`` (the HTTP request body's fields)."""
        request_id = request_id or f"{self._prefix}-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} is still running on this socket")
        stream = self._streams[request_id] = ChatStream(self, request_id)
        await self._send({"type": "chat.completion.create", "request_id": request_id, **body})
        return stream

    async def cancel(self, request_id: str) -> None:
        await self._send({"type": "chat.completion.cancel", "request_id": request_id})

    async def ping(self) -> None:
        """An application-level ping; returns when its pong arrives."""
        ping_id = f"{self._prefix}-p{next(self._ids)}"
        waiter = self._pongs[ping_id] = asyncio.get_running_loop().create_future()
        await self._send({"type": "ping", "id": ping_id})
        await waiter

    async def close(self) -> None:
        await self.connection.close()
        self._reader.cancel()

    async def _send(self, event: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(event))

    async def _read(self) -> None:
        try:
            async for message in self.connection:
                event = json.loads(message)
                kind = event.get("type")
                if kind == "pong":
                    waiter = self._pongs.pop(str(event.get("id")), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    continue
                stream = self._streams.get(event.get("request_id"))
                if stream is None:
                    continue  # an error about an event that named no request
                if kind in ("chat.completion.done", "error"):
                    del self._streams[stream.request_id]
                stream._events.put_nowait(event)
            await self.connection.wait_closed()
            protocol = self.connection.protocol
            closed: BaseException = ConnectionClosed(protocol.close_rcvd, protocol.close_sent)
        except ConnectionClosed as exc:
            closed = exc
        for stream in self._streams.values():
            stream._events.put_nowait(closed)
        for waiter in self._pongs.values():
            if not waiter.done():
                waiter.set_exception(closed)
        self._streams.clear()


class _Connecting:
    def __init__(self, url: str, api_key: str, options: dict[str, Any]) -> None:
        headers = dict(options.pop("additional_headers", None) or {})
        headers["Authorization"] = f"Bearer {api_key}"
        self._connect = connect(url, additional_headers=headers, subprotocols=None, **options)
        self._socket: ChatSocket | None = None

    async def __aenter__(self) -> ChatSocket:
        self._socket = ChatSocket(await self._connect)
        return self._socket

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        assert self._socket is not None
        await self._socket.close()
