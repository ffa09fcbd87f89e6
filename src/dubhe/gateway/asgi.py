"""The few raw-ASGI primitives the hot path needs, without a framework's per-request objects."""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dubhe.errors import DubheError, InvalidRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_CONTENT_TYPE = (b"content-type", b"application/json")
# Set by ``DubheHttpProtocol``: a weak reference to the request's uvicorn cycle, whose
# ``disconnected`` turns true when the client goes away (absent under another server).
CONNECTION_SCOPE_KEY = "dubhe.connection"


# A random prefix per process and a counter: unique across workers and instances without a
# system call per request (request ids key usage records, so they must never repeat).
_REQUEST_ID_PREFIX = "req_" + os.urandom(6).hex()
_request_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter) & 0xFFFFFFFFFFFF:012x}"


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(
                    f"The request body is larger than the limit of {limit} bytes; send a "
                    "shorter prompt.",
                    code="request_too_large",
                )
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before the request was complete."""


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        JSON_CONTENT_TYPE,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: DubheError, request_id: str) -> None:
    await send_json(
        send,
        error.status_code,
        error.body(),
        request_id,
        [(name.encode(), value.encode()) for name, value in error.headers.items()],
    )
