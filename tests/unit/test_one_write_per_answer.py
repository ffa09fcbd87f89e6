"""A response's headers are held until its body, so a whole answer is one write (one ``send``,
one segment); nothing is reordered and nothing held outlives the loop iteration. Through the
protocol's own transport wrapper, over a real socket pair."""

from __future__ import annotations

import asyncio
import socket

from dubhe.server._protocol import _CoalescingTransport


class _Recorded(asyncio.Protocol):
    pass


async def _pair() -> tuple[asyncio.Transport, socket.socket, list[bytes]]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(_Recorded, ours)
    writes: list[bytes] = []
    real_write = transport.write

    def write(data: bytes) -> None:  # counts the writes that reach the socket
        writes.append(bytes(data))
        real_write(data)

    transport.write = write  # type: ignore[method-assign]
    theirs.setblocking(False)
    return transport, theirs, writes


async def _received(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        data += await loop.sock_recv(peer, size - len(data))
    return data


async def test_headers_and_body_leave_in_one_write() -> None:
    transport, peer, writes = await _pair()
    wrapper = _CoalescingTransport(transport, asyncio.get_running_loop())
    wrapper.hold_next = True
    wrapper.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert writes == []
    wrapper.write(b"{}")
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    # The next response's headers are held only once they are flagged again: a stream's later
    # chunks go straight out.
    wrapper.write(b"more")
    assert writes[-1] == b"more"
    assert await _received(peer, 44) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}more"
    transport.close()
    peer.close()


async def test_headers_sent_alone_go_out_within_the_loop_iteration() -> None:
    transport, peer, writes = await _pair()
    wrapper = _CoalescingTransport(transport, asyncio.get_running_loop())
    wrapper.hold_next = True
    wrapper.write(b"HTTP/1.1 200 OK\r\n\r\n")  # an application that then waits for its body
    await asyncio.sleep(0)
    assert writes == [b"HTTP/1.1 200 OK\r\n\r\n"]
    assert await _received(peer, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    transport.close()
    peer.close()


async def test_close_sends_what_is_held_first() -> None:
    transport, peer, writes = await _pair()
    wrapper = _CoalescingTransport(transport, asyncio.get_running_loop())
    wrapper.hold_next = True
    wrapper.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    wrapper.close()
    assert writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    assert wrapper.is_closing()
    assert await _received(peer, 27) == b"HTTP/1.1 204 No Content\r\n\r\n"
    peer.close()
