"""Request body limits outside the hot path: refused on ``Content-Length`` before a byte of the
body is read, and counted while reading, for chunked bodies that declare no length."""

from __future__ import annotations

from collections import deque

from dubhe.errors import InvalidRequest
from dubhe.gateway.asgi import Message, Receive, Scope, header


def request_too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"The request body is larger than the limit of {limit} bytes for this endpoint.",
        code="request_too_large",
        # The unread rest of the body would follow on this connection: close it instead.
        headers={"connection": "close"},
    )


def declared_too_large(scope: Scope, limit: int) -> bool:
    """Whether the request says up front that its body exceeds ``limit``. httptools has already
    refused a Content-Length that is not a number."""
    length = header(scope, b"content-length")
    return length is not None and int(length) > limit


def nul_in_request() -> InvalidRequest:
    return InvalidRequest(
        "The request holds a NUL character (U+0000), which no field accepts; remove it.",
        code="invalid_text",
    )


def holds_nul(data: bytes, *, url_encoded: bool = False) -> bool:
    """Whether ``data`` holds a NUL: raw, as the JSON escape ``\\u0000`` (not an escaped
    backslash followed by "u0000"), or (a query string) percent-encoded."""
    if b"\x00" in data or url_encoded and b"%00" in data:
        return True
    at = data.find(b"u0000")
    while at != -1:
        # Count the backslashes just before it by walking back (not by slicing the text up to
        # it: a body of "u0000" repeated cost a copy per occurrence, 20 ms for 64 KiB).
        start = at
        while start and data[start - 1] == 0x5C:  # a backslash
            start -= 1
        if (at - start) % 2:
            return True
        at = data.find(b"u0000", at + 5)
    return False


def limited_receive(receive: Receive, limit: int, *, refuse_nul: bool = True) -> Receive:
    """``receive``, raising ``request_too_large`` once more than ``limit`` body bytes arrived,
    and ``invalid_text`` for a body holding a NUL (PostgreSQL's text refuses it: a sign-up
    with one was a 500; SQLite's JSON functions end a string there)."""
    received = 0
    tail = b""  # the end of the last read: an escape may straddle two

    async def receive_within_limit() -> Message:
        nonlocal received, tail
        message = await receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            received += len(body)
            if received > limit:
                raise request_too_large(limit)
            if refuse_nul and body:
                if holds_nul(tail + body):
                    raise nul_in_request()
                tail = (tail + body)[-16:]
        return message

    return receive_within_limit


async def read_ahead(receive: Receive) -> Receive:
    """Read the whole request body now (through ``receive``, so its limit applies); returns a
    ``receive`` that gives those messages back, then passes through (a disconnect, later)."""
    messages: deque[Message] = deque()
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break

    async def replay() -> Message:
        return messages.popleft() if messages else await receive()

    return replay
