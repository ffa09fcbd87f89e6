"""How Dubhe is served: uvicorn with a protocol that bounds what one connection can hold, body
limits outside the hot path, and the response headers no route owns (security, CORS)."""

import asyncio
from typing import Any

from dubhe.server._body import (
    declared_too_large,
    holds_nul,
    limited_receive,
    nul_in_request,
    read_ahead,
    request_too_large,
)
from dubhe.server._headers import HSTS, SECURITY_HEADERS, Cors
from dubhe.server._protocol import ConnectionLimits, DubheHttpProtocol


def websocket_protocol(**kwargs: Any) -> asyncio.Protocol:
    """uvicorn's ``ws`` protocol class, as a factory that imports it on the first upgrade: the
    ``websockets`` package and uvicorn's protocol on it stay out of every worker's start (about
    15 ms), and most workers never take a WebSocket."""
    from dubhe.server._websocket import DubheWebSocketProtocol

    return DubheWebSocketProtocol(**kwargs)


__all__ = [
    "HSTS",
    "SECURITY_HEADERS",
    "ConnectionLimits",
    "Cors",
    "DubheHttpProtocol",
    "declared_too_large",
    "holds_nul",
    "limited_receive",
    "nul_in_request",
    "read_ahead",
    "request_too_large",
    "websocket_protocol",
]
