"""OpenAI error envelopes and the two ways a simulated request can go wrong."""

from __future__ import annotations

import orjson


class InvalidRequest(Exception):
    """The request is well-formed JSON but cannot be answered (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class SimulatedConnectionCut(Exception):
    """Raised by the app after the response has started, on purpose.

    Raw ASGI offers no way to drop a socket; uvicorn closes the transport when an
    app fails after ``http.response.start``, which leaves the client with a
    truncated body — exactly the failure ``[[sim:cut_after=N]]`` asks for.
    """


def error_body(message: str, error_type: str, *, param: str | None = None,
               code: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def simulated_status_body(status: int) -> bytes:
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return error_body(f"simulated upstream error {status}", error_type)
