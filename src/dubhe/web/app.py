"""The FastAPI application for everything outside ``/v1``, and its error rendering.

Errors use the same envelope as ``/v1`` (``{"error": {"message", "type", "param", "code"}}``) with
the status the ``DubheError`` carries; every response carries ``x-request-id``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from dubhe.errors import (
    AuthenticationFailed,
    DubheError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    UnprocessableRequest,
)
from dubhe.gateway.asgi import Message, Receive, Scope, Send, header, new_request_id
from dubhe.server import HSTS
from dubhe.web.dependencies import WebState

log = logging.getLogger(__name__)


def create_web_app(state: WebState) -> FastAPI:
    from dubhe.accounts.endpoints import router as accounts_router
    from dubhe.accounts.pages import router as accounts_pages
    from dubhe.accounts.sessions import CsrfCookieMiddleware, LoginRequired, login_required_response
    from dubhe.billing.endpoints import router as billing_router
    from dubhe.dashboard.assets import static_files
    from dubhe.dashboard.endpoints import router as dashboard_router
    from dubhe.keys.endpoints import router as keys_router
    from dubhe.keys.pages import router as keys_pages
    from dubhe.payments.endpoints import router as payments_router
    from dubhe.routing.endpoints import router as routing_router

    app = FastAPI(
        title="Dubhe API",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        # A redirect would be built from the Host header, which the client chooses.
        redirect_slashes=False,
    )
    app.state.dubhe = state
    app.include_router(billing_router, prefix="/api")
    app.include_router(payments_router, prefix="/api")
    app.include_router(accounts_router, prefix="/api")
    app.include_router(keys_router, prefix="/api")
    app.include_router(dashboard_router)
    app.include_router(accounts_pages)
    app.include_router(keys_pages)
    app.include_router(routing_router)
    app.mount("/static", static_files(), name="static")
    app.add_exception_handler(DubheError, _dubhe_error)
    # More specific than DubheError: a page without a session redirects to /login instead.
    app.add_exception_handler(LoginRequired, login_required_response)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(CsrfCookieMiddleware, secure=state.settings.https)
    app.add_middleware(KeyFirstMiddleware, state=state)
    app.add_middleware(RequestIdMiddleware)
    return app


class RequestIdMiddleware:
    """Pure ASGI: puts ``x-request-id`` on every response, errors included, and HSTS on every
    answer to an https request (the static security headers are uvicorn's default headers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        added = [(b"x-request-id", request_id.encode())]
        if scope.get("scheme") == "https":
            added.append(HSTS)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        await self.app(scope, receive, send_with_id)


class KeyFirstMiddleware:
    """Pure ASGI: a request that carries an API key is authenticated before its body is read, so
    an unauthenticated client cannot make the worker read or parse anything. The identity is left
    in the scope for ``get_current_user``. Requests without a key go on (public routes, Stripe's
    webhook, sessions); their bodies are bounded per route by ``DubheApp``."""

    def __init__(self, app: Any, state: WebState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/api/stripe/webhook":
            authorization = header(scope, b"authorization")
            if authorization is not None:
                try:
                    identity = await self.state.keys.authenticate(authorization)
                except AuthenticationFailed as failed:
                    error = self.state.unauthenticated.judge(failed, scope.get("client"))
                    # RequestIdMiddleware (outside) adds the request id.
                    await render(error)(scope, receive, send)
                    return
                scope.setdefault("state", {})["api_key_identity"] = identity
        await self.app(scope, receive, send)


def render(error: DubheError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


async def _dubhe_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DubheError)
    if isinstance(exc, AuthenticationFailed):
        state: WebState = request.app.state.dubhe
        return render(state.unauthenticated.judge(exc, request.scope.get("client")))
    return render(exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or was cut off for sending its body too slowly); nobody reads this.
    return Response(status_code=400)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return render(InvalidRequest(
            "The request body is not valid JSON; send a JSON object.", code="invalid_json"
        ))
    param = _json_path([part for part in first.get("loc", ()) if part not in ("body", "query")])
    if kind == "missing":
        code = "missing_required_parameter"
        message = f"{param} is required."
    else:
        code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
        message = f"{param or 'the request'}: {first.get('msg', 'invalid value')}."
    return render(UnprocessableRequest(message, code=code, param=param or None))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: DubheError = NotFound(
            f"Unknown request URL: {request.method} {request.url.path}. See the API "
            "documentation for the available endpoints.",
            code="unknown_url",
        )
    elif exc.status_code == 400 and isinstance(exc.__cause__, DubheError):
        error = exc.__cause__  # raised while FastAPI read the body: too large
    elif exc.status_code == 400:
        error = InvalidRequest(
            "The request body could not be parsed; send a JSON object in UTF-8.",
            code="invalid_json",
        )
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}.",
            code="method_not_allowed", headers=dict(exc.headers or {}),
        )
    else:
        error = DubheError(str(exc.detail), status_code=exc.status_code, code=None,
                           headers=dict(exc.headers or {}))
    return render(error)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette renders this outside the middleware stack (and logs the traceback itself), so
    # the request id is taken from the scope, where RequestIdMiddleware left it.
    request_id = request.scope.get("state", {}).get("request_id") or new_request_id()
    response = render(DubheError(
        f"The server had an error processing your request (request id {request_id}); retry, "
        "and contact support with the request id if it persists.",
        code="internal_error",
    ))
    response.headers["x-request-id"] = request_id
    return response


def _json_path(parts: list[Any]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
