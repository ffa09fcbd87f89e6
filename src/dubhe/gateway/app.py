"""The ``/v1`` API as a raw ASGI application: a path switch, no framework on the hot path."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dubhe.billing.meter import Meter
from dubhe.catalog import Catalog
from dubhe.errors import AuthenticationFailed, DubheError, MethodNotAllowed, NotFound
from dubhe.gateway.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    header,
    new_request_id,
    send_error,
    send_json,
)
from dubhe.gateway.chat import chat_completions
from dubhe.gateway.models_list import ModelListings
from dubhe.keys.cache import KeyCache
from dubhe.providers import UpstreamPool
from dubhe.ratelimit import UnauthenticatedLimiter
from dubhe.routing import Router

log = logging.getLogger(__name__)

_CHAT = "/v1/chat/completions"
_MODELS = "/v1/models"
_MODELS_PREFIX = "/v1/models/"


@dataclass(slots=True)
class GatewayState:
    catalog: Catalog
    keys: KeyCache
    upstreams: UpstreamPool
    meter: Meter
    listings: ModelListings
    unauthenticated: UnauthenticatedLimiter
    router: Router = field(default_factory=Router)


class GatewayApp:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._route(scope, receive, tracked_send, request_id)
        except DubheError as error:
            if started:
                raise
            if isinstance(error, AuthenticationFailed):
                error = self.state.unauthenticated.judge(error, scope.get("client"))
            await send_error(send, error, request_id)
        except Exception:
            log.exception("unhandled error in %s %s (%s)", scope["method"], scope["path"], request_id)
            if started:
                return
            await send_error(
                send,
                DubheError(
                    f"The server had an error processing your request (request id {request_id}); "
                    "retry, and contact support with the request id if it persists.",
                    code="internal_error",
                ),
                request_id,
            )

    async def _route(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == _CHAT:
            _allow(method, "POST")
            await chat_completions(scope, receive, send, self.state, request_id)
        elif path == _MODELS or path == _MODELS + "/":
            _allow(method, "GET")
            identity = await self.state.keys.authenticate(header(scope, b"authorization"))
            await send_json(send, 200, self.state.listings.list_for(identity.plan_code), request_id)
        elif path.startswith(_MODELS_PREFIX):
            _allow(method, "GET")
            identity = await self.state.keys.authenticate(header(scope, b"authorization"))
            model_id = path[len(_MODELS_PREFIX) :]
            body = self.state.listings.one_for(identity.plan_code, model_id)
            await send_json(send, 200, body, request_id)
        else:
            raise NotFound(
                f"Unknown request URL: {method} {path}. See the API documentation for the "
                "available endpoints.",
                code="unknown_url",
            )


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(
            f"{method} is not allowed here; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        )
