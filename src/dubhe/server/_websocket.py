"""uvicorn's sans-I/O WebSocket protocol (on the pinned ``websockets``), with one fix.

An application that refuses an upgrade with an HTTP answer (the ``websocket.http.response``
extension: Dubhe's 401, 403 and 404 in the error envelope) leaves uvicorn 0.54 believing the
handshake never completed, so it logged "ASGI callable returned without completing handshake." at
ERROR for every refusal: a flood of bad keys would flood the log. The answer is complete once its
last body part is written; the protocol is told so.
"""

from __future__ import annotations

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class DubheWebSocketProtocol(WebSocketsSansIOProtocol):
    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True
