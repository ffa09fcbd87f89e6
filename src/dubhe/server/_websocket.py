"""uvicorn's sans-I/O WebSocket protocol (on the pinned ``websockets``), with two fixes.

A ping is answered at once, with no backpressure: a peer that floods pings and never reads made
the worker buffer every pong (tens of MB in seconds). A peer whose unread output already passes
``MAX_UNREAD_BYTES`` when it pings is cut off instead; its requests are then charged for what was
sent, as for any socket that goes away.

An application that refuses an upgrade with an HTTP answer (the ``websocket.http.response``
extension: Dubhe's 401, 403 and 404 in the error envelope) leaves uvicorn 0.54 believing the
handshake never completed, so it logged "ASGI callable returned without completing handshake." at
ERROR for every refusal: a flood of bad keys would flood the log. The answer is complete once its
last body part is written; the protocol is told so.
"""

from __future__ import annotations

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# Far above what a reading peer leaves buffered (sends wait for the buffer to drain below 64 KiB).
MAX_UNREAD_BYTES = 4 * 1024 * 1024


class DubheWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_ping(self) -> None:
        if self.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            self.transport.abort()
            return
        super().handle_ping()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True
