"""Clients that send too much or too slowly are cut off with 431/408 and the connection closed,
within bounded time and memory, while the same worker keeps answering ``/healthz``."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import Server
from tests.hardening.conftest import SLACK, HealthPoller, address, read_response, rss_kib

pytestmark = pytest.mark.usefixtures("health")


def connect(server: Server) -> socket.socket:
    return socket.create_connection(address(server), timeout=SLACK)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send, reporting False once the server has closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def chat_head(server: Server, length: int | None = None, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % length
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: dubhe\r\n"
            b"Authorization: Bearer " + server.key("pro").encode() + b"\r\n"
            b"Content-Type: application/json\r\n" + framing + b"\r\n")


def test_a_huge_header_is_refused_with_431_and_costs_little_memory(hardened: Server) -> None:
    before = rss_kib(hardened)
    with connect(hardened) as sock:
        send_quietly(sock, b"GET /v1/models HTTP/1.1\r\nHost: dubhe\r\nX-Big: ")
        sent = 0
        while sent < 64 * 1024 * 1024 and send_quietly(sock, b"a" * 65536):
            sent += 65536
        response = read_response(sock)
    assert sent < 64 * 1024 * 1024, "the server read a 64 MB header to the end"
    assert response.status == 431
    assert response.error()["code"] == "headers_too_large"
    assert response.error()["type"] == "invalid_request_error"
    assert response.closed
    assert rss_kib(hardened) - before < 32 * 1024, "a refused header grew the worker by 32 MB"


def test_too_many_headers_are_refused_with_431(hardened: Server) -> None:
    many = b"".join(b"X-H%d: 1\r\n" % index for index in range(60))
    with connect(hardened) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: dubhe\r\n" + many + b"\r\n")
        response = read_response(sock)
    assert response.status == 431
    assert response.error()["code"] == "headers_too_large"
    assert response.closed


def test_trickled_headers_time_out_with_408(hardened: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: dubhe\r\nX-Slow: " + b"s" * 1000
    started = time.monotonic()
    with connect(hardened) as sock:
        for byte in request:
            if not send_quietly(sock, bytes([byte])) or time.monotonic() - started > SLACK:
                break
            time.sleep(0.02)
        response = read_response(sock)
    assert response.status == 408
    assert response.error()["code"] == "request_timeout"
    assert response.closed
    assert time.monotonic() - started < SLACK


def test_connections_that_send_nothing_are_closed(hardened: Server) -> None:
    sockets = [connect(hardened) for _ in range(20)]
    try:
        for sock in sockets:
            response = read_response(sock)
            assert response.status == 408
            assert response.error()["code"] == "request_timeout"
            assert response.closed
    finally:
        for sock in sockets:
            sock.close()


def test_a_body_shorter_than_its_content_length_times_out(hardened: Server) -> None:
    with connect(hardened) as sock:
        sock.sendall(chat_head(hardened, length=1000) + b'{"model": "dubhe-fast"')
        response = read_response(sock)
    assert response.status == 408
    assert response.error()["code"] == "request_timeout"
    assert response.closed


def test_a_trickled_body_times_out(hardened: Server) -> None:
    body = b'{"model": "dubhe-fast", "messages": [{"role": "user", "content": "' + b"x" * 500
    started = time.monotonic()
    with connect(hardened) as sock:
        sock.sendall(chat_head(hardened, length=len(body) + 10))
        for byte in body:
            if not send_quietly(sock, bytes([byte])) or time.monotonic() - started > SLACK:
                break
            time.sleep(0.02)
        response = read_response(sock)
    assert response.status == 408
    assert response.closed


def test_an_idle_kept_alive_connection_is_closed(hardened: Server) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dubhe\r\n\r\n")
        response = read_response(sock, timeout=1)
        assert response.status == 200
        assert not response.closed  # kept alive for a second at least...
        sock.settimeout(SLACK)
        assert sock.recv(1) == b""  # ...then closed by the keep-alive limit


def test_an_oversized_declared_body_is_refused_before_it_is_read(hardened: Server) -> None:
    for head in (chat_head(hardened, length=10**12),
                 b"POST /api/redeem HTTP/1.1\r\nHost: dubhe\r\nContent-Length: 1000000000\r\n\r\n"):
        with connect(hardened) as sock:
            sock.sendall(head)
            response = read_response(sock)
        assert response.status == 400
        assert response.error()["code"] == "request_too_large"
        assert response.closed


def test_an_oversized_chunked_body_is_refused_while_it_is_read(hardened: Server) -> None:
    key = hardened.key("pro").encode()
    heads = [
        chat_head(hardened, chunked=True),  # /v1: the catalog's max_request_bytes (1 MB here)
        b"POST /api/redeem HTTP/1.1\r\nHost: dubhe\r\nAuthorization: Bearer " + key +
        b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    before = rss_kib(hardened)
    for head in heads:
        with connect(hardened) as sock:
            sock.sendall(head)
            sent = 0
            chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            while sent < 8 * 1024 * 1024 and send_quietly(sock, chunk):
                sent += 65536
            response = read_response(sock)
        assert response.status == 400
        assert response.error()["code"] == "request_too_large"
    assert rss_kib(hardened) - before < 32 * 1024


def test_an_unparseable_request_gets_the_json_envelope(hardened: Server) -> None:
    with connect(hardened) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        response = read_response(sock)
    assert response.status == 400
    assert response.error()["type"] == "invalid_request_error"
    assert response.closed


def test_past_the_connection_limit_new_connections_get_503(
    hardened: Server, health: HealthPoller
) -> None:
    # The limit is 40 per worker, the poller holds one; each of these asks for /healthz and keeps
    # its connection open.
    sockets = [connect(hardened) for _ in range(45)]
    try:
        statuses = []
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dubhe\r\n\r\n")
        for sock in sockets:
            response = read_response(sock, timeout=SLACK)
            statuses.append(response.status)
            if response.status == 503:
                assert response.error()["code"] == "server_busy"
                assert response.headers["retry-after"] == "1"
                assert response.closed
            else:
                assert response.status == 200
        assert statuses.count(503) >= 5
        assert statuses.count(200) >= 30
    finally:
        for sock in sockets:
            sock.close()


def test_an_answer_before_a_continue_closes_the_connection(hardened: Server) -> None:
    """A client that sent ``Expect: 100-continue`` waits for the 100 before its body. Answered
    without one (here a 401: the key is checked before the body is read), it may never send the
    body; on a kept-alive connection its next request would then be read as that body and never
    answered. The answer says ``connection: close`` and the connection closes at once."""
    body = b'{"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}]}'
    with connect(hardened) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: dubhe\r\n"
                     b"Authorization: Bearer sk-not-a-key\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        response = read_response(sock, timeout=1)  # the body deadline is 2 s
    assert response.status == 401
    assert response.headers["connection"] == "close"
    assert response.closed
    assert time.monotonic() - started < 1.5


def test_a_continued_request_keeps_its_connection(hardened: Server) -> None:
    """Asked for its body (``100 Continue``), the client sends it and the connection stays
    open for the next request."""
    body = b'{"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}]}'
    with connect(hardened) as sock:
        sock.sendall(chat_head(hardened, length=len(body))[:-2] + b"Expect: 100-continue\r\n\r\n")
        sock.settimeout(SLACK)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            assert chunk, "closed before the 100 Continue"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        response = read_response(sock, timeout=1)
        assert response.status == 200
        assert "connection" not in response.headers
        assert not response.closed
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dubhe\r\n\r\n")
        assert read_response(sock, timeout=1).status == 200
