"""Response headers that are not any one route's business: security headers and CORS.

The static security headers (``nosniff``, no framing, no referrer) go out on every response as
uvicorn's default headers, written by the protocol at no per-request cost; HSTS only on answers
to https requests (seen through the proxy's ``X-Forwarded-Proto``), by the web app's middleware.
CORS is for ``/v1`` only (browser clients of the API on another origin); it is off unless the
operator lists origins, and then costs a header scan per request.
"""

from __future__ import annotations

from dubhe.gateway.asgi import Message, Scope, Send, header, new_request_id

SECURITY_HEADERS: list[tuple[str, str]] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "frame-ancestors 'none'"),
    ("referrer-policy", "strict-origin-when-cross-origin"),
]
HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")

_ALLOWED_METHODS = b"GET, POST, OPTIONS"
# What a browser script may read from a /v1 answer besides the CORS-safelisted headers.
_EXPOSED = (b"x-request-id, retry-after, retry-after-ms, x-should-retry, x-dubhe-cost-usd, "
            b"x-dubhe-tokens-remaining, x-dubhe-balance-usd, x-dubhe-max-tokens-clamped, "
            b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
            b"x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
            b"x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")


class Cors:
    """Answers preflights and marks answers readable for the allowed origins (and only them)."""

    def __init__(self, origins: frozenset[str]) -> None:
        self.origins = {origin.encode() for origin in origins}

    async def preflight(self, scope: Scope, send: Send) -> bool:
        """Answer ``OPTIONS`` with ``Access-Control-Request-Method`` (a preflight); False if it
        is not one."""
        if scope["method"] != "OPTIONS" or header(scope, b"access-control-request-method") is None:
            return False
        origin = header(scope, b"origin")
        headers = [(b"content-length", b"0"), (b"x-request-id", new_request_id().encode()),
                   (b"vary", b"Origin")]
        if origin is not None and origin in self.origins:
            requested = header(scope, b"access-control-request-headers")
            headers += [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", _ALLOWED_METHODS),
                (b"access-control-max-age", b"600"),
            ]
            if requested:
                headers.append((b"access-control-allow-headers", requested))
        # A refused origin gets no CORS headers: the browser then blocks the request.
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True

    def wrap(self, scope: Scope, send: Send) -> Send:
        origin = header(scope, b"origin")
        if origin is None or origin not in self.origins:
            return send
        allowed = [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                   (b"access-control-expose-headers", _EXPOSED)]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *allowed]
            await send(message)

        return send_with_cors


