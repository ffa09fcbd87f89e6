"""The upstream HTTP client (``providers/http.py``) against scripted servers on real sockets:
keep-alive reuse, the three ways a body ends, timeouts, bounds, and every way an upstream can
break an answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from dubhe.providers.http import (
    MAX_HEADER_BYTES,
    BrokenAnswer,
    ConnectFailed,
    Endpoint,
    HttpClient,
    Timeouts,
)
from tests.conftest import free_port

TIMEOUTS = Timeouts(connect=2, read=2)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n" % (status, len(body), extra)) + body


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[Server, Endpoint]]:
    server = Server()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await script(reader, writer, server)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    endpoint = Endpoint.parse(f"http://127.0.0.1:{port}/v1/chat/completions",
                              {"content-type": "application/json", "authorization": "Bearer k"})
    try:
        yield server, endpoint
    finally:
        listening.close()


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         server: Server) -> None:
    while True:
        server.requests.append(await read_request(reader))
        writer.write(answer(b'{"n":%d}' % len(server.requests)))
        await writer.drain()


async def test_a_connection_is_kept_alive_and_the_request_is_sent_as_configured() -> None:
    client = HttpClient()
    async with serving(keep_answering) as (server, endpoint):
        for n in (1, 2, 3):
            response = await client.post(endpoint, b'{"a":1}', b"x-request-id: r1\r\n", TIMEOUTS)
            assert (response.status, await response.read()) == (200, b'{"n":%d}' % n)
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
        assert sorted(lines[1:]) == sorted([
            f"host: 127.0.0.1:{endpoint.port}".encode(), b"content-type: application/json",
            b"authorization: Bearer k", b"x-request-id: r1", b"content-length: 7"])
        assert body == b'{"a":1}'
    await client.close()


async def test_a_chunked_answer_arrives_as_it_is_sent() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        pieces = response.chunks()
        assert await anext(pieces) == b"first"  # before the rest is even sent
        release.set()
        assert [piece async for piece in pieces] == [b"second"]
    await client.close()


async def test_an_answer_without_a_length_ends_with_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2\n\n")
        await writer.drain()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"data: 1\n\ndata: 2\n\n"
        # That connection cannot be reused: the next request opens another.
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"data: 1\n\ndata: 2\n\n"
        assert server.connections == 2
    await client.close()


async def test_an_interim_answer_is_skipped_and_a_redirect_is_not_followed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     + answer(b"moved", 302, b"location: http://elsewhere.example/\r\n"))
        await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert response.status == 302
        assert response.headers["location"] == "http://elsewhere.example/"
        assert await response.read() == b"moved"
        assert server.connections == 1
    await client.close()


async def test_an_upstream_silent_past_the_read_timeout_times_out() -> None:
    async def silent_then_stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 server: Server) -> None:
        await read_request(reader)
        if server.connections == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
        await reader.read()

    client = HttpClient()
    async with serving(silent_then_stalls) as (server, endpoint):
        quick = Timeouts(connect=2, read=0.3)
        with pytest.raises(TimeoutError):  # no status line
            await client.post(endpoint, b"{}", b"", quick)
        response = await client.post(endpoint, b"{}", b"", quick)
        with pytest.raises(TimeoutError):  # the body stops
            await response.read()
        with pytest.raises(TimeoutError):  # the whole request's bound
            await client.post(endpoint, b"{}", b"", Timeouts(connect=2, read=None, total=0.3))
    await client.close()


async def test_a_refused_connection_is_connect_failed() -> None:
    client = HttpClient()
    endpoint = Endpoint.parse(f"http://127.0.0.1:{free_port()}/v1/chat/completions", {})
    with pytest.raises(ConnectFailed):
        await client.post(endpoint, b"{}", b"", TIMEOUTS)
    await client.close()


async def test_headers_past_the_bound_break_the_answer_but_a_large_body_does_not() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(MAX_HEADER_BYTES // 1000 + 2):
                writer.write(b"x-pad: " + b"p" * 1000 + b"\r\n")
        else:  # headers and a body far over the header bound, in one write
            writer.write(answer(b"b" * (4 * MAX_HEADER_BYTES)))
        await writer.drain()
        await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        with pytest.raises(BrokenAnswer, match="headers"):
            await client.post(endpoint, b"{}", b"", TIMEOUTS)
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert len(await response.read()) == 4 * MAX_HEADER_BYTES
    await client.close()


async def test_an_answer_cut_short_is_broken_and_bytes_after_it_end_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        else:
            writer.write(answer(b"{}") + b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        if server.connections == 2:
            await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        with pytest.raises(BrokenAnswer):
            await response.read()
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"{}"
        # The unasked-for answer after it: that connection is not trusted again.
        await asyncio.sleep(0.1)
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        await response.read()
        assert server.connections == 3
    await client.close()


async def test_an_idle_connection_the_upstream_closed_is_replaced_once() -> None:
    async def one_answer_per_connection(reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter, server: Server) -> None:
        server.requests.append(await read_request(reader))
        writer.write(answer(b"ok"))  # keep-alive, then closes as the next request comes
        await writer.drain()
        await reader.read(1)

    client = HttpClient()
    async with serving(one_answer_per_connection) as (server, endpoint):
        for _ in range(3):
            response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
            assert await response.read() == b"ok"
        assert len(server.requests) == 3  # each request reached the upstream exactly once
    await client.close()


async def test_closing_an_unfinished_answer_drops_the_connection() -> None:
    gone = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      server: Server) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"10000\r\n" + b"x" * 65536 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            gone.set()

    client = HttpClient()
    async with serving(endless) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        first = await anext(response.chunks())
        assert first
        # A consumer that stops reading holds a bounded buffer: the connection stops reading.
        await asyncio.sleep(0.3)
        assert response._buffered < 4 * 1024 * 1024
        response.close()
        await asyncio.wait_for(gone.wait(), 5)
    await client.close()


def test_a_header_that_could_split_the_request_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="line break"):
        Endpoint.parse("http://127.0.0.1:1/v1", {"authorization": "Bearer k\r\nx-evil: 1"})
    with pytest.raises(ValueError, match="http"):
        Endpoint.parse("ftp://127.0.0.1/v1", {})
    tls = Endpoint.parse("https://api.example.com/v1/messages?beta=1", {})
    assert (tls.host, tls.port, tls.tls) == ("api.example.com", 443, True)
    assert tls.head.startswith(b"POST /v1/messages?beta=1 HTTP/1.1\r\nhost: api.example.com")


async def test_a_partial_answer_left_after_an_answer_never_becomes_the_next_answer() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        if server.connections == 1:
            # A whole answer, then the start of another nobody asked for, in one write.
            writer.write(answer(b"first") + b"HTTP/1.1 500 Fake\r\nx-fake: 1")
        else:
            writer.write(answer(b"REAL"))
        await writer.drain()
        while await reader.read(65536):
            writer.write(answer(b"REAL"))

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"first"
        await asyncio.sleep(0.1)
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert (response.status, await response.read()) == (200, b"REAL")
        assert "x-fake" not in response.headers
        assert server.connections == 2
    await client.close()


@pytest.mark.parametrize("wire", [
    # A status under 100 is no interim answer: its body must not join the real one's.
    b"HTTP/1.1 000 X\r\ncontent-length: 5\r\n\r\nEVIL!HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nab",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
])
async def test_a_status_under_100_or_an_upgrade_breaks_the_answer(wire: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        writer.write(wire)
        await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        with pytest.raises(BrokenAnswer):
            response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
            await response.read()
    await client.close()


async def test_trailers_are_bounded_and_never_join_the_headers() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        while True:
            server.requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n")
            if len(server.requests) == 1:
                writer.write(b"x-trailer: small\r\n\r\n")
                continue
            writer.write(b"x-trailer: ")
            for _ in range(40):  # 40 MB of one trailer value, quadratic to join
                writer.write(b"a" * 1024 * 1024)
                await writer.drain()
            await reader.read()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"ab"
        assert "x-trailer" not in response.headers
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        with pytest.raises(BrokenAnswer, match="trailers"):
            await response.read()
    await client.close()


async def test_an_answer_before_the_request_was_written_is_not_reused() -> None:
    async def early_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           server: Server) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is never read
        writer.write(answer(b"too large", 413))
        await writer.drain()
        await asyncio.sleep(5)

    client = HttpClient()
    async with serving(early_answer) as (server, endpoint):
        response = await client.post(endpoint, b"x" * (8 * 1024 * 1024), b"", TIMEOUTS)
        assert (response.status, await response.read()) == (413, b"too large")
        assert not any(client._idle.values())  # its unsent body would be read as a request
    await client.close()


async def test_an_error_answer_is_never_followed_on_its_connection() -> None:
    """An upstream that refuses a small request before reading its body (the kernel took it
    whole, so nothing is left unsent) and keeps the connection alive would read that body as
    the next request, and its answer, perhaps quoting the first prompt, would go to the next
    client. After any answer that is not a 2xx the connection is dropped."""
    async def refuse_unread(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            server: Server) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body stays unread
        writer.write(answer(b"unauthorized", 401))
        await writer.drain()
        while True:  # the first body and the next request's head, read as one request
            head = await reader.readuntil(b"\r\n\r\n")
            server.requests.append(head)
            writer.write(answer(b"bad request line: " + head[:26], 400))
            await writer.drain()

    client = HttpClient()
    async with serving(refuse_unread) as (server, endpoint):
        response = await client.post(endpoint, b'{"prompt":"alice private"}', b"", TIMEOUTS)
        assert (response.status, await response.read()) == (401, b"unauthorized")
        response = await client.post(endpoint, b'{"prompt":"bob"}', b"", TIMEOUTS)
        assert response.status == 401 and await response.read() == b"unauthorized"
        assert server.connections == 2
    await client.close()


async def test_a_body_with_a_non_chunked_coding_ends_with_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nall of it")
        await writer.drain()

    client = HttpClient()
    async with serving(script) as (server, endpoint):
        response = await client.post(endpoint, b"{}", b"", TIMEOUTS)
        assert await response.read() == b"all of it"
    await client.close()
