"""The protocol's cycle (``_Cycle``) starts an answer with the same bytes, and leaves the same
state, as uvicorn's own ``RequestResponseCycle.send``: only cheaper. Each case is sent through
both, on a transport that records what is written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from dubhe.server._protocol import _Cycle

DEFAULTS = [(b"date", b"Thu, 03 Dec 2026 09:30:04 GMT"), (b"server", b"uvicorn"),
            (b"X-Content-Type-Options", b"nosniff")]
GATEWAY = [(b"content-type", b"application/json"), (b"content-length", b"431"),
           (b"x-request-id", b"req_90dfec3e3368000000124f56"),
           (b"x-dubhe-tokens-remaining", b"99"), (b"x-ratelimit-reset-requests", b"1ms")]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _cycle(cls: type[RequestResponseCycle], method: str, keep_alive: bool) -> Any:
    transport = _Transport()
    return cls(
        scope={"type": "http", "method": method, "path": "/v1/models"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"), access_logger=logging.getLogger("test"),
        access_log=False, default_headers=list(DEFAULTS), message_event=asyncio.Event(),
        expect_100_continue=True, keep_alive=keep_alive, on_response=lambda: None,
    )


CASES = [
    ("POST", True, 200, GATEWAY),
    ("POST", False, 200, GATEWAY),  # connection: close is added
    ("POST", True, 200, [(b"content-type", b"text/event-stream")]),  # no length: chunked
    ("HEAD", True, 200, [(b"content-type", b"text/plain")]),
    ("POST", True, 204, [(b"x-request-id", b"req_1")]),
    ("POST", True, 304, []),
    # Two lengths: the first counts, as in uvicorn.
    ("POST", True, 200, [(b"content-length", b"5"), (b"content-length", b"7")]),
    # uvicorn's own path: a capital letter, a connection or transfer-encoding header.
    ("POST", True, 200, [(b"Content-Length", b"3")]),
    ("POST", True, 200, [(b"content-length", b"3"), (b"connection", b"close")]),
    ("POST", True, 200, [(b"transfer-encoding", b"chunked")]),
]


@pytest.mark.parametrize(("method", "keep_alive", "status", "headers"), CASES)
async def test_the_same_bytes_and_state_as_uvicorn(method: str, keep_alive: bool, status: int,
                                                   headers: list[tuple[bytes, bytes]]) -> None:
    results = []
    for cls in (RequestResponseCycle, _Cycle):
        cycle = _cycle(cls, method, keep_alive)
        await cycle.send({"type": "http.response.start", "status": status, "headers": headers})
        state = {name: getattr(cycle, name) for name in (
            "response_started", "waiting_for_100_continue", "keep_alive", "chunked_encoding",
            "expected_content_length")}
        results.append((cycle.transport.written, state))
    assert results[0] == results[1]
    assert results[1][0][0].startswith(b"HTTP/1.1 %d" % status)


@pytest.mark.parametrize("bad", [
    [(b"x-evil", b"a\r\nset-cookie: b=c")],
    [(b"x-evil", b"a\nb")],
    [(b"x-evil", b"a\x00b")],
    [(b"x evil", b"a")],
    [(b"x-evil:", b"a")],
    [(b"content-length", b"3"), (b"x-ok", b"fine"), (b"x-bad", b"\x7f")],
])
async def test_a_header_uvicorn_refuses_is_refused(bad: list[tuple[bytes, bytes]]) -> None:
    for cls in (RequestResponseCycle, _Cycle):
        cycle = _cycle(cls, "POST", True)
        with pytest.raises(RuntimeError, match="Invalid HTTP header"):
            await cycle.send({"type": "http.response.start", "status": 200, "headers": bad})
        assert cycle.transport.written == []


async def test_every_byte_in_a_name_or_a_value_is_taken_as_uvicorn_takes_it() -> None:
    """Each of the 256 bytes in a header's name and in its value: refused by both, or written
    with the same bytes and state by both (the fast path hands anything unusual to uvicorn)."""
    for byte in range(256):
        for headers in ([(b"x-a" + bytes([byte]) + b"b", b"v")],
                        [(b"x-ab", b"v" + bytes([byte]) + b"w")]):
            outcomes = []
            for cls in (RequestResponseCycle, _Cycle):
                cycle = _cycle(cls, "POST", True)
                try:
                    await cycle.send({"type": "http.response.start", "status": 200,
                                      "headers": [(b"content-length", b"0"), *headers]})
                except RuntimeError as error:
                    outcomes.append(("refused", str(error), cycle.transport.written))
                else:
                    outcomes.append(("sent", b"".join(cycle.transport.written),
                                     cycle.chunked_encoding, cycle.expected_content_length))
            assert outcomes[0] == outcomes[1], (byte, headers)
