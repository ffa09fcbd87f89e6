"""How Dubhe is served: uvicorn with a protocol that bounds what one connection can hold, body
limits outside the hot path, and the response headers no route owns (security, CORS)."""

from dubhe.server._body import (
    declared_too_large,
    limited_receive,
    read_ahead,
    request_too_large,
)
from dubhe.server._headers import HSTS, SECURITY_HEADERS, Cors
from dubhe.server._protocol import ConnectionLimits, DubheHttpProtocol
from dubhe.server._websocket import DubheWebSocketProtocol

__all__ = [
    "HSTS",
    "SECURITY_HEADERS",
    "ConnectionLimits",
    "Cors",
    "DubheHttpProtocol",
    "DubheWebSocketProtocol",
    "declared_too_large",
    "limited_receive",
    "read_ahead",
    "request_too_large",
]
