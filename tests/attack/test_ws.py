"""Red team of ``/v1/ws/chat`` (decisions.md §7) through a real ``dubhe serve``: a client that
speaks the protocol on a raw TCP socket (``websockets``' sans-I/O client), so that it can do what
a well-behaved library never does: stop reading for good, flood control frames, hold sockets.

Each test here failed on 910dad1 (branch ``ws``) and passes once the finding is fixed."""

from __future__ import annotations

import asyncio
import json
import socket as socketlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.conftest import wait_for_row
from tests.upstreams.realistic import Realistic
from tests.ws.conftest import WsBilling, bearer, create


class RawSocket:
    """A WebSocket client on a bare TCP socket with a tiny receive buffer: nothing is read unless
    the test says so, and the protocol is framed by hand (no automatic pongs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ClientProtocol) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol

    @classmethod
    async def connect(cls, url: str, key: str, rcvbuf: int = 4096) -> RawSocket:
        parts = urlsplit(url)
        raw = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM)
        raw.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_RCVBUF, rcvbuf)
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, (parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=raw, limit=2**20)
        protocol = ClientProtocol(parse_uri(url), max_size=None)
        request = protocol.connect()
        request.headers["Authorization"] = f"Bearer {key}"
        protocol.send_request(request)
        self = cls(reader, writer, protocol)
        await self.flush()
        while True:
            data = await asyncio.wait_for(reader.read(65536), 15)
            assert data, "closed during the handshake"
            protocol.receive_data(data)
            events = protocol.events_received()
            if any(isinstance(event, Response) for event in events):
                assert protocol.handshake_exc is None, protocol.handshake_exc
                return self

    async def flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            self.writer.write(chunk)
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        await self.flush()

    async def read_frames(self, timeout: float = 15) -> list[Frame]:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            return []
        self.protocol.receive_data(data)
        return [event for event in self.protocol.events_received() if isinstance(event, Frame)]

    def abort(self) -> None:
        self.writer.transport.abort()


async def usage_of(ws: WsBilling, user_id: int, timeout: float) -> Any:
    return await wait_for_row(ws.engine, "SELECT * FROM usage_records WHERE user_id = :u",
                              timeout=timeout, u=user_id)


async def test_a_reader_that_never_reads_is_charged_once_the_server_drops_it(ws: WsBilling) -> None:
    """A client that stops reading for good while a long answer streams: the server's pings go
    unanswered and uvicorn drops the socket (1011, keepalive timeout) within 1 + 3 seconds here.
    The request must then be charged for what was sent, as a half-open socket's is.

    On 910dad1 it is not: uvicorn's ``transport.close()`` waits for the write buffer to drain,
    which a peer that never reads never lets happen, so ``connection_lost`` never comes, the
    request's task waits forever in uvicorn's ``send`` (``writable.wait()``), the hold is never
    settled and the upstream connection stays open. The client decides when (if ever) the
    request is billed; a worker restart returns the hold unused."""
    key, user_id = await ws.new_account("roomy")
    raw = await RawSocket.connect(ws.ws_url, key)
    await raw.send_text(create("stuck", "dubhe-qwen", "x [[up:tokens=60000]]", max_tokens=60000))
    await asyncio.sleep(1)  # the answer fills every buffer between the server and us
    record = await usage_of(ws, user_id, timeout=20)
    try:
        assert record is not None, "nothing was charged 20 s after the socket stopped reading"
    finally:
        raw.abort()


async def test_reading_after_the_server_dropped_the_socket_is_not_free(ws: WsBilling) -> None:
    """The same reader, once the server has given up on it, reads everything that was buffered
    for it (about 20,000 tokens here). Its reading wakes the blocked send, which fails
    (uvicorn already sent its close frame: ``RuntimeError``), so the request starts settling:
    ``completion.abandon()`` awaits the relay's token count (a thread for a long answer). The
    buffer then drains, ``connection_lost`` queues the disconnect, and the receive loop cancels
    every request still in ``self.requests`` (``request.cancel("socket")``): the cancellation
    lands inside ``abandon()``, ``completion.close()`` then releases the hold unused, and the
    usage record says outcome ``error``, 0 prompt and 0 completion tokens, $0.

    Impact: every request is free (the hold is returned in full), as many as the attacker likes,
    four at a time per socket and any number of sockets; the operator pays the upstream for
    every token generated (47,000 for 20,000 delivered in the probe). Fix in
    ``gateway/ws.py``: a request whose task has begun settling (``_SocketGone`` or the
    ``Exception`` path) must not be cancelled again (mark it ``shielded`` before ``abandon()``,
    or shield ``abandon()``), and ``ChatCompletion.abandon`` should not lose the relay's count
    when cancelled (``relay.measured`` clears its batch first)."""
    key, user_id = await ws.new_account("roomy")
    raw = await RawSocket.connect(ws.ws_url, key)
    await raw.send_text(create("free", "dubhe-qwen", "x [[up:tokens=60000]]", max_tokens=60000))
    await asyncio.sleep(8)  # the buffers fill, the pings go unanswered, the server drops us
    delivered = 0
    try:
        while True:
            frames = await raw.read_frames(timeout=5)
            if not frames and raw.reader.at_eof():
                break
            for frame in frames:
                if frame.opcode.name == "TEXT":
                    delivered += json.loads(frame.data)["type"] == "chat.completion.chunk"
    except TimeoutError:
        pass
    finally:
        raw.abort()
    assert delivered > 1000, delivered  # the setup worked: a long answer was delivered
    record = await usage_of(ws, user_id, timeout=20)
    assert record is not None
    assert record["completion_tokens"] >= delivered - 5, (delivered, dict(record))
    # Charged (from the plan's included tokens here), not released unused with 0 and 0.
    assert record["prompt_tokens"] > 0 and record["outcome"] != "error", dict(record)
    await ws.assert_consistent(user_id)


def server_rss_kb(root: int) -> int:
    """Resident memory of the server process and its children (uvicorn's workers), in KiB."""
    pids = {root}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == root:
                pids.add(int(entry.name))
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("VmRSS:"))
    return total


# A client ping with the largest control payload (125 bytes), masked with a zero key.
_PING = bytes([0x89, 0x80 | 125]) + bytes(4) + b"p" * 125


async def test_a_ping_flood_from_a_peer_that_never_reads_does_not_grow_the_worker(
    ws: WsBilling,
) -> None:
    """Control frames are not messages: uvicorn answers each client ping at once with a
    ``transport.write`` of its pong (``handle_ping``), without looking at ``writable``, and the
    socket's message rate (4429) never sees them. A peer that floods pings and never reads makes
    the worker buffer every pong: here about 60 MB in the 4 s before the keepalive timeout
    (1 + 3 s; 40 s by default, so several hundred MB per socket), and the buffer is never freed
    while the peer keeps the TCP connection (``transport.close()`` waits to flush it). A handful
    of sockets runs the worker out of memory; meanwhile its event loop does nothing but pongs.

    Fix: a ``DubheWebSocketProtocol.handle_ping`` (server/_websocket.py) that stops reading
    while the transport is paused for writing (or drops pongs beyond a small backlog), and counts
    control frames in the socket's rate limit."""
    key, _ = await ws.new_account("roomy")
    pid = ws.server.running.process.pid
    before = server_rss_kb(pid)
    raw = await RawSocket.connect(ws.ws_url, key, rcvbuf=4096)
    block = _PING * 8000  # about 1 MB of pings
    try:
        for _ in range(80):
            raw.writer.write(block)
            try:
                await asyncio.wait_for(raw.writer.drain(), 10)
            except (TimeoutError, ConnectionError):
                break  # the server stopped reading, or cut us off: the flood is over
        await asyncio.sleep(6)  # past the keepalive timeout: whatever is buffered stays
        grown_mb = (server_rss_kb(pid) - before) / 1024
    finally:
        raw.abort()
    # A peer that never reads should cost the worker its write buffer's high-water mark
    # (64 KiB) and the kernel's socket buffers, not tens of megabytes.
    assert grown_mb < 20, f"the worker grew by {grown_mb:.0f} MB buffering pongs nobody reads"


async def test_a_cancel_sent_on_the_last_chunk_does_not_cut_the_count(
    ws: WsBilling, realistic: Realistic
) -> None:
    """An upstream that reports no usage in its streams (many do not) is charged on Dubhe's own
    count of what was relayed, made when the stream ends: ``relay.measured()`` takes the last
    batch of events out of ``_batch`` and counts it in a thread. The request's phase is still
    "running" then, so a ``chat.completion.cancel`` sent the moment the client sees the
    ``finish_reason`` chunk cancels the task inside that count; ``abandon()`` then calls
    ``measured()`` again, which finds the batch already emptied and counts only the batches
    counted before (each 1 MiB, about 6,000 tokens). The client got every token; up to a
    mebibyte of them per request is never billed (7,092 of 9,000 in the probe; 0 of 3,000 here
    when it lands, about one try in six). A cancel landing
    in the ``gather`` of earlier batches instead raises out of ``abandon()`` and the hold is
    released unused (the whole request free).

    Fix: ``gateway/ws.py`` marks the request "shielded" once the upstream's stream has ended
    (before the settlement inside ``ChatCompletion._events``, not after it), or the settlement
    is shielded from cancellation; and ``StreamRelay.measured`` should not drop its batch before
    the count is done."""
    key, user_id = await ws.new_account("roomy")
    short: list[tuple[int, int, str]] = []
    async with connect(ws.ws_url, additional_headers=bearer(key), max_size=None) as socket:
        for attempt in range(12):  # a race (the cancel must land in the count): several tries
            request_id = f"last-{attempt}"
            await socket.send(create(request_id, "dubhe-qwen",
                                     "x [[up:tokens=3000]] [[up:usage=none]]", max_tokens=3000))
            while True:
                event = json.loads(await asyncio.wait_for(socket.recv(), 60))
                if event["type"] != "chat.completion.chunk":
                    break
                if event["choices"] and event["choices"][0].get("finish_reason"):
                    await socket.send(json.dumps({"type": "chat.completion.cancel",
                                                  "request_id": request_id}))
            assert event["type"] == "chat.completion.done", event
            generated = realistic.charged(event["server_request_id"])
            assert generated is not None and generated["completion_tokens"] == 3000
            record = await wait_for_row(ws.engine,
                                        "SELECT * FROM usage_records WHERE request_id = :r",
                                        timeout=10, r=event["server_request_id"])
            assert record is not None
            if record["completion_tokens"] < 3000:
                short.append((attempt, record["completion_tokens"], record["outcome"]))
    assert not short, f"delivered 3,000 tokens, billed fewer: {short}"
    await ws.assert_consistent(user_id)


async def test_one_key_cannot_hold_any_number_of_sockets(ws: WsBilling) -> None:
    """Every limit of the socket is per socket (DUBHE_WS_MAX_CONCURRENT running, MAX_QUEUED
    waiting, the message rate), and nothing bounds the sockets one key (or one address) opens:
    opening more sockets multiplies them all. Each idle socket also costs its worker a watchdog
    task waking four times a second (``_KEY_CHECK_SECONDS``) for up to the idle timeout (300 s),
    the key re-checked on every socket whenever the key cache changes: in the probe, 1,000 idle
    sockets of one key took 15% of a core of an otherwise idle worker, so a few thousand
    saturate it for everyone. Fix: a cap on open sockets per key (and per client address for
    the upgrade) in ``ChatSocketEndpoint.__call__``, refused as an HTTP 429 before the upgrade,
    shared by the workers or per worker."""
    key, _ = await ws.new_account("roomy")
    opened: list[RawSocket] = []
    refused = 0
    try:
        for _ in range(200):
            try:
                opened.append(await RawSocket.connect(ws.ws_url, key))
            except AssertionError:  # the handshake was refused (an HTTP answer, not 101)
                refused += 1
                break
    finally:
        for raw in opened:
            raw.abort()
    assert refused, f"one key held {len(opened)} WebSockets open at once"


async def test_dropping_the_socket_on_the_last_chunk_does_not_make_the_answer_free(
    ws: WsBilling, realistic: Realistic
) -> None:
    """The disconnect variant of the cancel above (and of test_cut_count.py over HTTP): the
    client cuts the TCP connection when it reads the ``finish_reason`` chunk; the receive loop
    cancels the request inside the end-of-stream count, and ``abandon()`` counts from the relay's
    emptied batch. Same fix."""
    short: list[tuple[int, int, str]] = []
    for attempt in range(6):  # a race on PostgreSQL (lost on the first try on SQLite): tries
        key, user_id = await ws.new_account("roomy")
        socket = await connect(ws.ws_url, additional_headers=bearer(key), max_size=None)
        await socket.send(create("cut", "dubhe-qwen", "x [[up:tokens=3000]] [[up:usage=none]]",
                                 max_tokens=3000))
        while True:
            event = json.loads(await asyncio.wait_for(socket.recv(), 60))
            assert event["type"] == "chat.completion.chunk", event
            if event["choices"] and event["choices"][0].get("finish_reason"):
                socket.transport.abort()
                break
        record = await usage_of(ws, user_id, timeout=15)
        assert record is not None
        server_request_id = record["request_id"]
        generated = realistic.charged(server_request_id)
        assert generated is not None and generated["completion_tokens"] == 3000
        if record["completion_tokens"] < 3000:
            short.append((attempt, record["completion_tokens"], record["outcome"]))
        await ws.assert_consistent(user_id)
    assert not short, f"delivered 3,000 tokens, billed fewer: {short}"
