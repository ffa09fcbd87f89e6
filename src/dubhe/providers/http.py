"""The upstream HTTP/1.1 client: keep-alive connections on asyncio protocols, httptools parsing.

aiohttp cost ~300 µs of CPU per proxied request on this hardware (measured: 64 concurrent
keep-alive POSTs against the sim), against ~75 µs for this client, and it was the largest single
cost on the hot path. Dubhe needs little of it: POST one body to a configured address and read the
answer, whole or as it arrives. So this client is small:

- one idle-connection pool per (scheme, host, port), no connection cap (concurrency is the rate
  limiter's job, which can answer 429 instead of queueing), idle connections dropped after
  ``keepalive_seconds``; a reused connection the upstream had already closed is replaced once,
  before any byte of an answer arrived (the keep-alive race every HTTP client has);
- redirects are never followed (a 3xx is an answer like any other), nothing is decompressed,
  nothing is sent but the caller's headers, ``host`` and ``content-length``;
- timeouts: ``connect``, ``read`` (between two reads, the first byte of the answer included:
  an upstream that trickles bytes is bounded by ``total`` and, for streams, by the first-byte
  timeout of ``completion.py``), ``total``;
- bounds: an answer's headers at most ``MAX_HEADER_BYTES`` (interim 1xx answers included),
  the bytes between two pieces of its body (chunk framing, extensions, trailers)
  ``_MAX_BYTES_WITHOUT_BODY``; while the consumer lags, reading pauses past
  ``_HIGH_WATER`` buffered bytes, so a fast upstream cannot fill a worker's memory;
- a connection is reused only after a 2xx answer that ended cleanly with the whole request
  written: bytes after an answer, a status under 100 or an upgrade break it.

Failures raise ``ConnectFailed`` (nothing was sent: another deployment may take the request) or
``BrokenAnswer`` (the connection broke or the answer is not valid HTTP), both ``HttpError``, or
``TimeoutError``. ``Response.close()`` drops the connection unless the answer was read whole, so
an abandoned stream stops the upstream generating.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

MAX_HEADER_BYTES = 64 * 1024
# Buffered answer bytes past which the connection stops reading until the consumer catches up;
# each buffered piece also counts what Python spends on holding it (many tiny chunks).
_HIGH_WATER = 1024 * 1024
_PIECE_OVERHEAD = 64
# Bytes of a chunked answer that are not body (chunk extensions, trailers): more than this
# (several reads with no body) breaks the answer. None of them reaches the consumer, and bytes
# that keep arriving keep the read timeout away: unbounded, they would hold a request forever.
_MAX_BYTES_WITHOUT_BODY = 1024 * 1024


class HttpError(Exception):
    """The upstream could not be reached, or its answer broke off or is not HTTP."""


class ConnectFailed(HttpError):
    """No connection could be made (refused, unresolvable, TLS, or the connect timeout)."""


class BrokenAnswer(HttpError):
    """The connection ended, or the answer stopped being valid HTTP, before it was complete."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None
    read: float | None  # between two reads of the answer, and before its status line
    total: float | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A URL taken apart once, with the request head that every POST to it starts with."""

    host: str
    port: int
    tls: bool
    head: bytes  # request line, host and the fixed headers; content-length follows

    @classmethod
    def parse(cls, url: str, headers: dict[str, str]) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        authority = f"[{host}]" if ":" in host else host
        if port != (443 if tls else 80):
            authority += f":{port}"
        for name, value in headers.items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"the header {name!r} holds a line break or NUL")
        lines = [f"POST {target} HTTP/1.1", f"host: {authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return cls(host=host, port=port, tls=tls, head="\r\n".join(lines).encode("latin-1"))


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


class Response:
    """One answer: ``status`` and ``headers`` (lower-case names) once returned by ``post``; the
    body through ``read``, ``read_up_to`` or ``chunks``."""

    __slots__ = ("_buffered", "_chunks", "_complete", "_connection", "_error", "_waiter",
                 "headers", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection ----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data) + _PIECE_OVERHEAD
        if self._buffered > _HIGH_WATER and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if self._complete or self._error is not None:
            return
        if error is None:
            self._complete = True
        else:
            self._error = error
        self._connection = None
        self._wake()

    # -- read by the consumer -----------------------------------------------------------------

    async def _more(self) -> bool:
        """Wait until something is buffered or the answer ended; False when nothing more will
        come. Raises what broke the answer."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return False
            connection = self._connection
            assert connection is not None
            connection.resume()
            self._waiter = connection.loop.create_future()
            await self._waiter
        return True

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while await self._more():
            parts.append(self._take())
        return b"".join(parts)

    async def read_up_to(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body; the rest is never read (``close`` drops it)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and await self._more():
            data = self._take()
            if size + len(data) > limit:
                data = data[: limit - size]
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever is buffered at each wake-up, joined."""
        while await self._more():
            yield self._take()

    def close(self) -> None:
        """Drop the connection if the answer is not complete (the upstream stops sending)."""
        connection = self._connection
        if connection is not None:
            connection.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one answer on it at a time."""

    def __init__(self, pool: HttpClient, key: tuple[str, int, bool],
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self.pool = pool
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_done: asyncio.Future[None] | None = None
        self.header_bytes = 0
        self.got_bytes = False  # any byte of the current answer arrived
        self.to_eof = False  # the current answer's body ends when the connection does
        self.closed = False
        self.paused = False
        # Bytes read since the last piece of body, once the headers are done.
        self.without_body = 0
        self.idle_since = 0.0
        self.last_read = 0.0
        self.read_timeout: float | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: an upstream talking out of turn
            self.abort()
            return
        self.got_bytes = True
        self.last_read = self.loop.time()
        self.without_body += len(data)  # on_body resets it
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # An upgrade (a 101) is no chat answer either.
            self._fail(BrokenAnswer(f"invalid HTTP answer: {type(exc).__name__} {exc}"))
            return
        if self.headers_done is not None:
            # Still in the headers: the parser holds at most this much of them, plus one read.
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._fail(BrokenAnswer(f"answer headers over {MAX_HEADER_BYTES} bytes"))
        elif self.without_body > _MAX_BYTES_WITHOUT_BODY:
            # httptools joins a trailer's value by concatenation, and skips an extension.
            self._fail(BrokenAnswer(f"answer chunk extensions or trailers over "
                                    f"{_MAX_BYTES_WITHOUT_BODY} bytes"))  # fmt: skip

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timers()
        self.pool._forget(self)
        if self.response is not None or self.headers_done is not None:
            if exc is None and self.to_eof and self.headers_done is None:
                self._done()  # a body delimited by the end of the connection
            else:
                self._fail(BrokenAnswer("the upstream closed the connection mid-answer"))

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is None:
            # The start of a message nobody asked for (bytes after the answer): it would be
            # taken for the next request's answer. Stops the parser; see data_received.
            raise BrokenAnswer("bytes after the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is None:
            raise BrokenAnswer("bytes after the answer")
        if self.headers_done is None:
            return  # a trailer: never mixed into the headers already returned
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            raise BrokenAnswer("bytes after the answer")
        status = self.parser.get_status_code()
        if status < 100:
            raise BrokenAnswer(f"status {status}")
        if status < 200:
            response.headers.clear()  # an interim answer (100 Continue): the real one follows
            return
        response.status = status
        self.without_body = 0
        headers = response.headers
        coding = headers.get("transfer-encoding", "").strip().lower()
        self.to_eof = ("content-length" not in headers and not coding.endswith("chunked")
                       and status not in (204, 304))  # fmt: skip
        waiter, self.headers_done = self.headers_done, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.without_body = 0
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return  # an interim answer (100 Continue): the real one follows
        self._done()

    # -- driving one answer -------------------------------------------------------------------

    async def exchange(self, request: bytes, timeouts: Timeouts) -> Response:
        assert self.transport is not None
        response = self.response = Response(self)
        self.headers_done = self.loop.create_future()
        self.header_bytes = 0
        self.got_bytes = False
        self.to_eof = False
        self.without_body = 0
        self.last_read = self.loop.time()
        self.read_timeout = timeouts.read
        if timeouts.read is not None:
            self.pool._watch_reads(self, timeouts.read)
        if timeouts.total is not None:
            self._deadline = self.loop.call_later(timeouts.total, self._fail, TimeoutError())
        self.transport.write(request)
        try:
            await self.headers_done
        except BaseException:
            self.abort()
            raise
        return response

    def _check_read(self, now: float) -> None:
        """Called by the pool's sweep (``HttpClient._sweep_reads``) while an answer is read."""
        if self.response is None or self.read_timeout is None:
            return
        if self.paused:
            # The consumer is behind, not the upstream: the clock starts again when it resumes.
            self.last_read = now
        elif now >= self.last_read + self.read_timeout:
            self._fail(TimeoutError())

    def _done(self) -> None:
        response, self.response = self.response, None
        self._stop_timers()
        if response is not None:
            response._finish()
        if (self.closed or self.to_eof or not self.parser.should_keep_alive()
                or self.parser.get_status_code() >= 300
                or (self.transport is not None and self.transport.get_write_buffer_size())):
            # Not reusable: ended by its close, asked to close, an answer that came before the
            # whole request was written (the rest would be read as the next request), or one
            # that is not a success: an upstream may refuse a request (401, 413) before reading
            # a body the kernel already took, and read that body as the next request, whose
            # answer could then quote this request's prompt to another client. Failures are
            # rare; a new connection costs little.
            self.abort()
        else:
            self.resume()
            self.pool._release(self)

    def _fail(self, error: BaseException) -> None:
        response, self.response = self.response, None
        waiter, self.headers_done = self.headers_done, None
        self._stop_timers()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if response is not None:
            response._finish(error)
        self.abort()

    def _stop_timers(self) -> None:
        self.pool._reading.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.last_read = self.loop.time()
            self.transport.resume_reading()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self.pool._forget(self)


class HttpClient:
    """The keep-alive pool of one worker, shared by every deployment."""

    def __init__(self, keepalive_seconds: float = 30) -> None:
        self.keepalive_seconds = keepalive_seconds
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        # Connections reading an answer under a read timeout, and the one timer that checks
        # them every tenth of the shortest such timeout (between 50 ms and 1 s): a timeout fires
        # up to that late. A timer of the event loop per answer cost one started and one
        # cancelled per request.
        self._reading: set[_Connection] = set()
        self._read_tick = 1.0
        self._read_sweep: asyncio.TimerHandle | None = None

    async def post(self, endpoint: Endpoint, body: bytes, headers: bytes,
                   timeouts: Timeouts) -> Response:  # fmt: skip
        """POST ``body`` with the endpoint's fixed headers and ``headers`` (lines each ending
        in CRLF, may be empty); returns once the answer's headers arrived."""
        request = b"%s\r\n%scontent-length: %d\r\n\r\n%s" % (endpoint.head, headers, len(body),
                                                            body)  # fmt: skip
        connection = self._reusable(endpoint)
        if connection is not None:
            try:
                return await connection.exchange(request, timeouts)
            except BrokenAnswer:
                if connection.got_bytes:
                    raise
                # The upstream closed the idle connection as this request was written: it read
                # nothing, so the request goes once more, on a new connection.
        connection = await self._connect(endpoint, timeouts.connect)
        return await connection.exchange(request, timeouts)

    def _reusable(self, endpoint: Endpoint) -> _Connection | None:
        idle = self._idle.get((endpoint.host, endpoint.port, endpoint.tls))
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive_seconds:
                return connection
            connection.abort()
        return None

    async def _connect(self, endpoint: Endpoint, seconds: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        key = (endpoint.host, endpoint.port, endpoint.tls)
        try:
            async with asyncio.timeout(seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, key, loop), endpoint.host, endpoint.port,
                    ssl=_tls_context() if endpoint.tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {endpoint.host}:{endpoint.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"connecting to {endpoint.host}:{endpoint.port} failed: "
                                f"{type(exc).__name__}") from None  # fmt: skip
        self._open.add(connection)
        return connection

    def _watch_reads(self, connection: _Connection, read_timeout: float) -> None:
        self._reading.add(connection)
        tick = min(max(read_timeout / 10, 0.05), 1.0)
        if tick < self._read_tick:
            self._read_tick = tick
            if self._read_sweep is not None:
                self._read_sweep.cancel()
                self._read_sweep = None
        if self._read_sweep is None:
            self._read_sweep = connection.loop.call_later(self._read_tick, self._sweep_reads)

    def _sweep_reads(self) -> None:
        self._read_sweep = None
        if not self._reading:
            return  # started again by the next answer
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self._reading):
            connection._check_read(now)
        self._read_sweep = loop.call_later(self._read_tick, self._sweep_reads)

    def _release(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        self._reading.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()
        if self._read_sweep is not None:
            self._read_sweep.cancel()
            self._read_sweep = None
