"""Servers with tight, test-sized limits, and the raw-socket tools slow-client tests need.

Each module starts its own ``dubhe serve`` (one per module, so xdist's ``--dist loadfile`` keeps it
in one worker) with short deadlines, so a timeout is reached in seconds, and a ``HealthPoller``
that checks, on its own kept-alive connection, that ``/healthz`` on the same worker keeps
answering while a bad client does its worst. Deadlines are generous: the benchmark measures
latency, these tests only show that nothing stalls or grows without bound.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import Server, Sim, assert_clean_log, free_port, gateway_config, start_server

# Test-sized limits (the defaults are in Settings).
LIMITS = {
    "DUBHE_HEADER_TIMEOUT_SECONDS": "2",
    "DUBHE_BODY_TIMEOUT_SECONDS": "2",
    "DUBHE_KEEPALIVE_TIMEOUT_SECONDS": "3",
    "DUBHE_MAX_HEADER_BYTES": "8192",
    "DUBHE_MAX_HEADER_COUNT": "50",
    "DUBHE_MAX_CONNECTIONS": "40",
    "DUBHE_API_MAX_BODY_BYTES": "4096",
    "DUBHE_WEBHOOK_MAX_BODY_BYTES": "8192",
    "DUBHE_UNAUTHENTICATED_PER_MINUTE": "6",
    "DUBHE_UNAUTHENTICATED_BURST": "10",
    "DUBHE_CORS_ALLOW_ORIGINS": "https://app.example, https://other.example",
    "DUBHE_STRIPE_WEBHOOK_SECRET": "whsec_" + "0" * 32,
}
# Generous: far beyond any deadline, short of a hang.
SLACK = 10.0


@pytest.fixture(scope="module")
def hardened(sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on SQLite with the limits above (no money is at stake in these tests)."""
    data_dir = tmp_path_factory.mktemp("hardened")
    url = f"sqlite+aiosqlite:///{data_dir / 'dubhe.db'}"
    running = start_server(data_dir, url, gateway_config(sims, dead_port=free_port()), **LIMITS)
    yield running
    running.running.stop()
    assert_clean_log(running)


def address(server: Server) -> tuple[str, int]:
    port = int(server.base_url.rsplit(":", 1)[1].split("/")[0])
    return "127.0.0.1", port


def rss_kib(server: Server) -> int:
    """The worker's resident memory (``dubhe serve`` with one worker serves in-process)."""
    status = Path(f"/proc/{server.running.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after it

    def error(self) -> dict[str, object]:
        assert self.headers.get("content-type") == "application/json", self.headers
        envelope = orjson.loads(self.body)
        assert set(envelope["error"]) == {"message", "type", "param", "code"}, envelope
        assert self.headers.get("x-request-id", "").startswith("req_"), self.headers
        return envelope["error"]  # type: ignore[no-any-return]


def read_response(sock: socket.socket, timeout: float = SLACK) -> Response:
    """One HTTP/1.1 response with a Content-Length body, and whether the server then closed."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = _recv(sock)
        if not chunk:
            break
        body += chunk
    return Response(int(status_line.split()[1]), headers, body, closed=closes(sock, timeout))


def closes(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (reading and dropping any bytes)."""
    sock.settimeout(timeout)
    try:
        while _recv(sock):
            pass
    except TimeoutError:
        return False
    return True


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


@dataclass
class HealthPoller:
    """Polls ``/healthz`` on one kept-alive connection from a thread while a test runs."""

    url: str
    failures: list[str] = field(default_factory=list)
    answered: int = 0
    slowest: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=SLACK) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.get(self.url)
                    if response.status_code != 200:
                        self.failures.append(f"status {response.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.answered += 1
                self._stop.wait(0.05)


@pytest.fixture
def health(hardened: Server) -> Iterator[HealthPoller]:
    """Asserts, after the test, that ``/healthz`` answered throughout, each within seconds."""
    poller = HealthPoller(hardened.base_url.removesuffix("/v1") + "/healthz")
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SLACK
    while poller.answered == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    answered_before = poller.answered
    yield poller
    # One more answer after the test's damage, on the same connection.
    deadline = time.monotonic() + SLACK
    while poller.answered <= answered_before and time.monotonic() < deadline:
        time.sleep(0.01)
    poller._stop.set()
    thread.join(SLACK * 2)
    assert not poller.failures, poller.failures
    assert poller.answered > answered_before >= 1
    assert poller.slowest < 5.0, f"/healthz stalled for {poller.slowest:.1f} s"
