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


def limited_receive(receive: Receive, limit: int) -> Receive:
    """``receive``, raising ``request_too_large`` once more than ``limit`` body bytes arrived."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise request_too_large(limit)
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
