"""The ``/v1`` API as a raw ASGI application: a path switch, no framework on the hot path."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
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
from dubhe.gateway.chat import RATE_LIMIT_SCOPE_KEY, chat_completions
from dubhe.gateway.models_list import ModelListings
from dubhe.keys.cache import KeyCache, KeyIdentity
from dubhe.metrics import count_request
from dubhe.metrics.requests import observe
from dubhe.providers import UpstreamPool
from dubhe.ratelimit import PlanLimiter, UnauthenticatedLimiter
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
    limits: PlanLimiter
    # Models an admin switched to maintenance at run time (dubhe.admin.maintenance keeps it).
    maintenance: frozenset[str] = frozenset()
    access_log: bool = False
    router: Router = field(default_factory=Router)


class GatewayApp:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        began = time.perf_counter()
        tracked_send = _Tracked(send, scope["path"])
        try:
            await self._route(scope, receive, tracked_send, request_id)
        except DubheError as error:
            if tracked_send.started:
                raise
            if isinstance(error, AuthenticationFailed):
                error = self.state.unauthenticated.judge(error, scope.get("client"))
            ticket = scope.get(RATE_LIMIT_SCOPE_KEY)
            if ticket is not None and "x-ratelimit-limit-requests" not in error.headers:
                error.headers.update(
                    (name.decode(), value.decode()) for name, value in ticket.headers())
            await send_error(tracked_send, error, request_id)
        except Exception:
            log.exception("unhandled error in %s %s (%s)", scope["method"], scope["path"], request_id)
            if tracked_send.started:
                return
            await send_error(
                tracked_send,
                DubheError(
                    f"The server had an error processing your request (request id {request_id}); "
                    "retry, and contact support with the request id if it persists.",
                    code="internal_error",
                ),
                request_id,
            )
        finally:
            # The answer is sent: latency, tokens and cost, and the access log line.
            observe(scope, tracked_send.status, request_id, began, log_line=self.state.access_log)

    def _limit_headers(self, identity: KeyIdentity) -> list[tuple[bytes, bytes]]:
        catalog = self.state.catalog
        plan = catalog.plans.get(identity.plan_code) or catalog.plans[catalog.default_plan]
        return self.state.limits.standing_headers(identity, plan)

    async def _route(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == _CHAT:
            _allow(method, "POST")
            await chat_completions(scope, receive, send, self.state, request_id)
        elif path == _MODELS or path == _MODELS + "/":
            _allow(method, "GET")
            identity = await self.state.keys.authenticate(header(scope, b"authorization"))
            await send_json(send, 200, self.state.listings.list_for(identity.plan_code), request_id,
                            self._limit_headers(identity))
        elif path.startswith(_MODELS_PREFIX):
            _allow(method, "GET")
            identity = await self.state.keys.authenticate(header(scope, b"authorization"))
            model_id = path[len(_MODELS_PREFIX) :]
            body = self.state.listings.one_for(identity.plan_code, model_id)
            await send_json(send, 200, body, request_id, self._limit_headers(identity))
        else:
            raise NotFound(
                f"Unknown request URL: {method} {path}. See the API documentation for the "
                "available endpoints.",
                code="unknown_url",
            )


class _Tracked:
    """The ASGI ``send`` with the answer's status noted (and counted) as it starts. Not a
    coroutine: it returns the inner send's awaitable, so a stream's every event is one
    coroutine, not two."""

    __slots__ = ("_send", "_path", "started", "status")

    def __init__(self, send: Send, path: str) -> None:
        self._send = send
        self._path = path
        self.started = False
        self.status = 0

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            count_request(self._path, self.status)
        return self._send(message)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(
            f"{method} is not allowed here; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        )
