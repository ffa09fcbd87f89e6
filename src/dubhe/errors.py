"""Errors that carry their HTTP status, type and code, rendered by one handler per surface.

The tree (OpenAI's ``type`` in brackets):

    DubheError
    ├── InvalidRequest [invalid_request_error] 400: bad JSON, missing or over-size body
    │   ├── NotFound 404: unknown path, unknown or not-included model
    │   ├── MethodNotAllowed 405
    │   └── UnprocessableRequest 422: wrong type or value, unsupported capability, context length
    ├── AuthenticationFailed [authentication_error] 401: missing, malformed, unknown, revoked, expired key
    ├── Forbidden [invalid_request_error] 403: not allowed for this caller (sign-up closed, wrong password)
    ├── InsufficientQuota [insufficient_quota] 402: plan allowance and balance cannot cover it
    │   └── AccountInDebt 402: usage the account could not pay is owed first
    ├── RateLimited [rate_limit_error] 429
    └── GatewayError [server_error]
        ├── UpstreamError 500: the upstream answered with an error
        ├── UpstreamUnreachable 502: connection refused, reset or timed out
        └── ServiceUnavailable 503: model in maintenance, no healthy upstream
"""

from __future__ import annotations

import orjson


class DubheError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequest(DubheError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFound(InvalidRequest):
    status_code = 404


class MethodNotAllowed(InvalidRequest):
    status_code = 405


class UnprocessableRequest(InvalidRequest):
    status_code = 422


class AuthenticationFailed(DubheError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(DubheError):
    status_code = 403
    error_type = "invalid_request_error"


class InsufficientQuota(DubheError):
    status_code = 402
    error_type = "insufficient_quota"

    def __init__(self, message: str, **kwargs: object) -> None:
        super().__init__(message, code="insufficient_quota", **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("x-should-retry", "false")


class AccountInDebt(InsufficientQuota):
    """The account owes usage it could not pay; nothing is served until a credit covers it."""


class RateLimited(DubheError):
    status_code = 429
    error_type = "rate_limit_error"


class GatewayError(DubheError):
    error_type = "server_error"


class UpstreamError(GatewayError):
    status_code = 500


class UpstreamUnreachable(GatewayError):
    status_code = 502


class ServiceUnavailable(GatewayError):
    status_code = 503


class Conflict(DubheError):
    """A business conflict outside /v1 (an e-mail already registered, a code already redeemed)."""

    status_code = 409
    error_type = "invalid_request_error"
