"""uvicorn's httptools protocol with the connection limits it lacks.

uvicorn bounds neither the size nor the arrival time of request headers, nor the arrival time of a
body, and a connection that never sends a byte is never closed: one client can hold a worker's
memory (httptools accumulates a header value by concatenation, so an 80 MB header also costs
seconds of CPU) or its connections forever. This subclass enforces, per connection:

- headers larger than ``max_header_bytes`` or more than ``max_header_count`` of them: 431
  ``headers_too_large``, then close (counted as bytes arrive, before httptools has the whole
  header, so memory stays bounded by the limit plus one read);
- headers not complete ``header_timeout_seconds`` after the connection opened or the request's
  first byte arrived: 408 ``request_timeout``, then close (this also closes connections that send
  nothing);
- a body not complete ``body_timeout_seconds`` after its headers (a Content-Length larger than
  what is sent, a trickle): 408, then close; the application sees a disconnect;
- more than ``max_connections`` open on this worker: 503 ``server_busy``, then close, at once
  rather than a hang;
- an answer to an ``Expect: 100-continue`` request that begins before its body was asked for:
  ``connection: close``, then close (the client may never send that body).

A deadline fires up to a tenth of the shortest one late (at most 1 s; see ``_Sweeper``). Idle
keep-alive is uvicorn's own ``timeout_keep_alive``. Every answer written here is the
error envelope of ``decisions.md`` §2 with an ``x-request-id``, like the application's own; so is
the 400 uvicorn writes for a request it cannot parse.
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import TimerHandle
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from dubhe.errors import DubheError, InvalidRequest, ServiceUnavailable
from dubhe.gateway.asgi import CONNECTION_SCOPE_KEY, new_request_id
from dubhe.settings import Settings, load_settings


class _Sweeper:
    """Calls the connections' deadlines that are due, every ``tick`` seconds: a tenth of the
    shortest deadline, between 50 ms and 1 s, so a deadline fires at most that late (a 10 s
    header deadline between 10 and 11 s). It walks uvicorn's set of the worker's open
    connections (a WebSocket's protocol has no deadline), a few hundred ns each."""

    _running: _Sweeper | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, connections: set[Any], tick: float) -> None:
        self.loop = loop
        self.connections = connections
        self.tick = tick
        self.handle: TimerHandle = loop.call_later(tick, self.sweep)

    @classmethod
    def watch(cls, loop: asyncio.AbstractEventLoop, connections: set[Any],
              limits: ConnectionLimits) -> None:
        running = cls._running
        if running is not None and running.loop is loop and running.connections is connections:
            return
        if running is not None:
            running.handle.cancel()
        shortest = min(limits.header_timeout_seconds, limits.body_timeout_seconds)
        cls._running = cls(loop, connections, min(max(shortest / 10, 0.05), 1.0))

    def sweep(self) -> None:
        if self.loop.is_closed():
            return
        now = self.loop.time()
        for connection in list(self.connections):
            callback = getattr(connection, "_on_due", None)
            if callback is not None and connection._due <= now:
                connection._on_due = None
                try:
                    callback()
                except Exception:
                    connection.logger.exception("a connection deadline failed")
        self.handle = self.loop.call_later(self.tick, self.sweep)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    max_header_count: int
    header_timeout_seconds: float
    body_timeout_seconds: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_seconds=settings.header_timeout_seconds,
            body_timeout_seconds=settings.body_timeout_seconds,
            max_connections=settings.max_connections,
        )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; carries the answer to write."""

    def __init__(self, error: DubheError) -> None:
        super().__init__(error.message)
        self.error = error


def _headers_too_large(limits: ConnectionLimits) -> DubheError:
    return InvalidRequest(
        f"The request headers are too large: at most {limits.max_header_count} headers and "
        f"{limits.max_header_bytes} bytes in all. Send fewer or shorter headers.",
        status_code=431, code="headers_too_large",
    )


def _too_slow(what: str, seconds: float) -> DubheError:
    return InvalidRequest(
        f"The request {what} did not arrive within {seconds:g} seconds; send the whole request "
        "promptly, and retry.",
        status_code=408, code="request_timeout",
    )


class _CoalescingTransport:
    """What a response is written through: its first write (the status line and headers) is held
    until its next one (the body), so a whole answer leaves in one write, one ``send`` and one
    segment instead of two. Nothing is reordered, and nothing held waits past the current
    iteration of the event loop (an application that sends its headers and then waits has them
    sent meanwhile)."""

    __slots__ = ("_held", "_loop", "_transport", "hold_next")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self.hold_next = False  # set for each new response

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data = self._held + data
            self._held = None
        elif self.hold_next:
            self.hold_next = False
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()


# The default headers (date, server, the security headers) as one block, for the list uvicorn
# holds this second (it builds a new list when the date changes).
_default_block: tuple[object, bytes] = (None, b"")


def _default_headers_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    global _default_block
    if _default_block[0] is not headers:
        _default_block = (headers, b"".join(
            b"%s: %s\r\n" % (name.lower(), value) for name, value in headers))
    return _default_block[1]


# A header name's characters on the fast path (RFC 9110's token characters, lowercase), and a
# value's (what uvicorn's HEADER_VALUE_RE allows: all but the control characters bar tab).
_LOWER_TOKEN = b"abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
_VALUE_BYTES = bytes(byte for byte in range(256) if byte == 9 or 0x1F < byte != 0x7F)


class _Cycle(RequestResponseCycle):
    """uvicorn's request-response cycle with a cheaper start of the answer. uvicorn checks each
    header against two regular expressions, lowercases it and compares it with three names, about
    a microsecond a header; a ``/v1`` answer carries 17. Here the names and the values are each
    checked with one ``bytes.translate`` of their concatenation (a character is in it exactly
    when it is in one of them), and the block is joined at once. Only an answer whose names are
    lowercase token characters, whose values hold no control character but tab, and
    that sets neither ``connection`` nor ``transfer-encoding`` takes this path (all of Dubhe's
    but the protocol's own refusals); anything else is uvicorn's own ``send``, as are the body
    messages. The state it leaves is what uvicorn's would (tests/unit/test_answer_start.py)."""

    # Not a coroutine: what it returns is awaited, so every other message (a stream's events)
    # awaits uvicorn's own send directly, with no coroutine of this class around it.
    def send(self, message: Any) -> Awaitable[None]:  # type: ignore[override]
        if (self.response_started or self.disconnected or self.flow.write_paused
                or self.access_log or message["type"] != "http.response.start"):
            return super().send(message)
        headers = message.get("headers", ())
        names = b"".join([name for name, _ in headers])
        # What is left of the names once lowercase token characters are taken out, and of the
        # values once the characters a value may hold are: anything else is uvicorn's to check
        # (it refuses what HEADER_RE and HEADER_VALUE_RE find, lowercases capitals).
        if (names.translate(None, _LOWER_TOKEN) or b"connection" in names
                or b"transfer-encoding" in names
                or b"".join([value for _, value in headers]).translate(None, _VALUE_BYTES)):
            return super().send(message)
        status = message["status"]
        self.response_started = True
        self.waiting_for_100_continue = False
        content = [STATUS_LINE[status], _default_headers_block(self.default_headers)]
        for name, value in headers:
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        if (self.chunked_encoding is None and self.scope["method"] != "HEAD"
                and status not in (204, 304)):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))
        return _SENT


class _Sent:
    """An awaitable that is already done (the answer's start is written)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return (yield from ())


_SENT = _Sent()


def _closing_if_not_continued(cycle: RequestResponseCycle) -> Callable[[Any], Any]:
    """``cycle.send`` for a request that sent ``Expect: 100-continue``: an answer that begins
    before the body was asked for (a 401, a 413) ends the connection. Never told to continue,
    the client may not send the body at all, and on a kept-alive connection its next request
    would be read as that body and never answered (RFC 9110, 10.1.1)."""
    send = cycle.send

    async def guarded(message: Any) -> None:
        if (message["type"] == "http.response.start" and cycle.waiting_for_100_continue
                and cycle.more_body):  # fmt: skip
            cycle.keep_alive = False  # the answer says "connection: close", then closes
        await send(message)

    return guarded


class DubheHttpProtocol(HttpToolsProtocol):
    # Read once per worker process from the environment, like the application's settings.
    _limits: ConnectionLimits | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if DubheHttpProtocol._limits is None:
            DubheHttpProtocol._limits = ConnectionLimits.from_settings(load_settings())
        self.limits: ConnectionLimits = DubheHttpProtocol._limits
        self._due = 0.0  # loop time
        self._on_due: Callable[[], None] | None = None
        # Bytes received since the current request's first byte while its headers are
        # incomplete; None once they are complete (or before a request begins).
        self._header_bytes: int | None = 0
        self._header_count = 0
        self._in_body = False
        self._over_capacity = False
        self._coalescing: _CoalescingTransport | None = None

    # -- connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _Sweeper.watch(self.loop, self.connections, self.limits)
        self._coalescing = _CoalescingTransport(transport, self.loop)
        # The connection itself counts (it is in self.connections already).
        self._over_capacity = len(self.connections) > self.limits.max_connections
        self._arm(self.limits.header_timeout_seconds, self._headers_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._header_bytes is None and not self._in_body and self._idle():
            # The first bytes of the next request on a kept-alive connection.
            self._header_bytes = 0
            self._arm(self.limits.header_timeout_seconds, self._headers_timed_out)
        if self._header_bytes is not None:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._disarm()  # the WebSocket protocol takes the connection over, with its own limits
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.error)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._header_bytes is not None and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(_headers_too_large(self.limits))

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        if self._header_bytes is None:  # a pipelined request: its bytes came with the last one
            self._header_bytes = 0
            self._arm(self.limits.header_timeout_seconds, self._headers_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            raise _Refused(_headers_too_large(self.limits))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._over_capacity:
            raise _Refused(ServiceUnavailable(
                "The server is at its connection limit; retry shortly.",
                code="server_busy", headers={"retry-after": "1"},
            ))
        self._header_bytes = None
        self._in_body = True
        self._arm(self.limits.body_timeout_seconds, self._body_timed_out)
        super().on_headers_complete()
        if self.cycle is not None:
            assert self._coalescing is not None
            self.cycle.__class__ = _Cycle  # the same object, with _Cycle's send
            self.cycle.transport = self._coalescing  # type: ignore[assignment]
            # Only a cycle that starts now: a pipelined one (queued behind a response still
            # being written) would hold that response's next chunk instead of its own headers.
            queued = bool(self.pipeline) and self.pipeline[0][0] is self.cycle
            self._coalescing.hold_next = not queued
            # The application runs later, in a task: it can ask whether its client left without
            # a task of its own waiting in receive() (gateway/chat.py).
            # A weak reference: the cycle holds the scope, which must not hold the cycle.
            scope: dict[str, Any] = self.cycle.scope  # type: ignore[assignment]
            scope[CONNECTION_SCOPE_KEY] = weakref.ref(self.cycle)
            if self.expect_100_continue:
                self.cycle.send = _closing_if_not_continued(self.cycle)  # type: ignore[method-assign,assignment]

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    # -- deadlines --------------------------------------------------------------------------

    # A deadline is a time and a callback on the connection; one timer per worker (_Sweeper)
    # calls the callbacks that are due. A timer of the event loop per deadline cost two timers
    # started and three cancelled per request.

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._due = self.loop.time() + seconds
        self._on_due = callback

    def _disarm(self) -> None:
        self._on_due = None

    def _headers_timed_out(self) -> None:
        if self._header_bytes is None or self.transport.is_closing():
            return
        if self._idle():
            self._refuse(_too_slow("headers", self.limits.header_timeout_seconds))
        else:  # an earlier pipelined request is still answering: no room for a 408
            self.transport.close()

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if not cycle.response_started:
            self._refuse(_too_slow("body", self.limits.body_timeout_seconds))
        else:
            self.transport.close()
        # The application may be waiting in receive(): it now sees a disconnect.
        cycle.disconnected = True
        cycle.message_event.set()

    # -- answers written by the protocol ----------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequest(
            "The request is not valid HTTP/1.1; check the request line and headers.",
            code="invalid_http",
        ))

    def _refuse(self, error: DubheError) -> None:
        """Write ``error`` as the envelope, then close: the rest of the request is unread."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self._coalescing is not None:
            self._coalescing.flush()  # a response held this iteration goes out before the error
        body = error.body()
        lines = [STATUS_LINE[error.status_code]]
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", new_request_id().encode()),
            *((name.encode(), value.encode()) for name, value in error.headers.items()),
            (b"connection", b"close"),
        ]
        for name, value in headers:
            lines.extend([name, b": ", value, b"\r\n"])
        lines.extend([b"\r\n", body])
        self.transport.write(b"".join(lines))
        self.transport.close()
