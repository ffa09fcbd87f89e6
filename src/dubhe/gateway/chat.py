"""``POST /v1/chat/completions``: the hot path.

Per request: one HMAC and dict lookup for the key, one orjson parse, validation of the fields
Dubhe owns, one upstream call on a shared aiohttp session, and a byte-level relay. Metering is
handed to the meter, whose writes are group-committed off the request's own path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from sqlalchemy.exc import SQLAlchemyError

from dubhe.billing.meter import Denied, SettleResult
from dubhe.billing.pricing import format_usd
from dubhe.billing.service import debt_message
from dubhe.errors import (
    DubheError,
    InsufficientQuota,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnprocessableRequest,
    UpstreamError,
    UpstreamUnreachable,
)
from dubhe.gateway.asgi import (
    ClientGone,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_json,
)
from dubhe.gateway.relay import StreamRelay
from dubhe.gateway.validation import ChatRequest, validate_chat_request
from dubhe.models.base import utcnow
from dubhe.usage import tokens
from dubhe.usage.events import UsageEvent

if TYPE_CHECKING:
    from dubhe.catalog import ModelSpec
    from dubhe.gateway.app import GatewayState
    from dubhe.keys.cache import KeyIdentity
    from dubhe.providers import Upstream

log = logging.getLogger(__name__)

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PING = b": ping\n\n"
# Upstream error bodies are read for their message, never relayed whole.
_MAX_ERROR_BODY = 64 * 1024
# Prompts up to this many characters are counted exactly (tens of µs); longer ones are estimated
# generously for the hold and settled on the upstream's own count.
_EXACT_COUNT_CHARS = 16_384


async def chat_completions(
    scope: Scope, receive: Receive, send: Send, state: GatewayState, request_id: str
) -> None:
    started = time.perf_counter()
    identity = await state.keys.authenticate(header(scope, b"authorization"))
    try:
        raw = await read_body(receive, state.catalog.max_request_bytes)
    except ClientGone:
        return
    body = _parse_body(raw)
    model = _resolve_model(body, identity, state)
    request = validate_chat_request(body, model)
    prompt_tokens = _check_context(body, request, model)
    if model.status == "maintenance":
        raise ServiceUnavailable(
            f"The model '{model.id}' is under maintenance; retry later.",
            code="model_maintenance",
            headers={"retry-after": "60"},
        )
    upstreams = state.upstreams.for_model(model.id)
    if not upstreams:
        raise ServiceUnavailable(
            f"No upstream is configured for '{model.id}'; retry later or contact the operator.",
            code="no_healthy_upstream",
            headers={"retry-after": "30"},
        )
    upstream = upstreams[0]
    output = request.max_tokens or min(model.default_max_tokens, model.context_window - prompt_tokens)
    try:
        held = await state.meter.reserve(
            user_id=identity.user_id,
            request_id=request_id,
            api_key_id=identity.key_id,
            model=model.id,
            prompt_tokens=prompt_tokens,
            max_tokens=output * request.n,
        )
    except (SQLAlchemyError, OSError) as exc:
        # Credit could not be leased (the database is unreachable): refuse rather than serve
        # unbilled, and say it is temporary.
        log.warning("admission of %s failed: %s", request_id, exc)
        raise ServiceUnavailable(
            "Your account's credit cannot be checked right now; retry shortly.",
            code="billing_unavailable",
            headers={"retry-after": "5"},
        ) from None
    if isinstance(held, Denied):
        raise _insufficient_quota(held, prompt_tokens)
    extra_headers = _balance_headers(held.balance.tokens_remaining, held.balance.balance_uusd)
    if held.admission.clamped:
        # What the account can pay for, split over the n choices (at least one token each).
        per_choice = max(1, held.admission.max_tokens // request.n)
        for field in ("max_tokens", "max_completion_tokens"):
            if field in body or field == request.max_tokens_field:
                body[field] = per_choice
        extra_headers.append((b"x-dubhe-max-tokens-clamped", str(per_choice).encode()))
    payload = _upstream_payload(body, raw, request, model, upstream, held.admission.clamped)
    call = _Call(scope, receive, send, state, request_id, identity, model, upstream, request, body)
    call.started = started
    call.extra_headers = extra_headers
    await call.run(payload)


def _insufficient_quota(denied: Denied, prompt_tokens: int) -> InsufficientQuota:
    if denied.debt_uusd:
        return InsufficientQuota(debt_message(denied.debt_uusd))
    return InsufficientQuota(
        "Your plan's included tokens and prepaid balance cannot cover this request: you have "
        f"{denied.balance.tokens_remaining} included tokens and "
        f"${format_usd(denied.balance.balance_uusd)} left, and it needs at least "
        f"{prompt_tokens + 1} tokens (the prompt plus one). Recharge your balance or upgrade "
        "your plan in the dashboard."
    )


def _balance_headers(tokens_remaining: int, balance_uusd: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-dubhe-tokens-remaining", str(tokens_remaining).encode()),
        (b"x-dubhe-balance-usd", format_usd(balance_uusd).encode()),
    ]


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc.args[0]}); send a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            "The request body must be a JSON object with 'model' and 'messages'.",
            code="invalid_json",
        )
    for field in ("model", "messages"):
        if body.get(field) is None:
            raise InvalidRequest(
                f"Missing required parameter: '{field}'.",
                code="missing_required_parameter",
                param=field,
            )
    return body


def _resolve_model(body: dict[str, Any], identity: KeyIdentity, state: GatewayState) -> ModelSpec:
    model_id = body["model"]
    if not isinstance(model_id, str):
        raise UnprocessableRequest(
            "Invalid type for 'model': expected a string.", code="invalid_type", param="model"
        )
    catalog = state.catalog
    plan = catalog.plans.get(identity.plan_code)
    model = catalog.models.get(model_id)
    if model is not None and plan is not None and model_id in plan.models:
        return model
    if model is None:
        message = (
            f"The model '{model_id}' does not exist. List the models you can use with "
            "GET /v1/models."
        )
    else:
        including = ", ".join(p.name for p in catalog.plans_including(model_id)) or "no plan"
        message = (
            f"The model '{model_id}' is not included in your plan; it is included in: "
            f"{including}. Upgrade your plan in the dashboard, or list your models with "
            "GET /v1/models."
        )
    raise NotFound(message, code="model_not_found", param="model")


def _check_context(body: dict[str, Any], request: ChatRequest, model: ModelSpec) -> int:
    """The prompt's tokens (exact for ordinary prompts), refusing what cannot fit the context."""
    messages = body["messages"]
    if request.text_chars <= _EXACT_COUNT_CHARS:
        prompt = tokens.count_prompt(messages)
    else:
        # About three characters a token for prose and code: generous for the hold.
        prompt = request.text_chars // 3 + 4 * len(messages) + 3
    output = request.max_tokens or 1
    if prompt + output > model.context_window and request.text_chars > _EXACT_COUNT_CHARS:
        prompt = tokens.count_prompt(messages)
    if prompt + output > model.context_window:
        raise UnprocessableRequest(
            f"This model's maximum context length is {model.context_window} tokens. However, "
            f"you requested {prompt + (request.max_tokens or 0)} tokens ({prompt} in the messages, "
            f"{request.max_tokens or 0} in the completion). Shorten the messages or lower max_tokens.",
            code="context_length_exceeded",
            param="messages",
        )
    return prompt


def _upstream_payload(
    body: dict[str, Any],
    raw: bytes,
    request: ChatRequest,
    model: ModelSpec,
    upstream: Upstream,
    changed: bool,
) -> bytes:
    """The original bytes when nothing needs to change; re-serialised only when it must."""
    upstream_model = upstream.upstream_model(model.id)
    if upstream_model != model.id:
        body["model"] = upstream_model
        changed = True
    if request.stream and not request.include_usage:
        options = body.get("stream_options") or {}
        body["stream_options"] = {**options, "include_usage": True}
        changed = True
    return orjson.dumps(body) if changed else raw


class _Call:
    """One forwarded request: the upstream exchange, the client's disconnect, the metering."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        state: GatewayState,
        request_id: str,
        identity: KeyIdentity,
        model: ModelSpec,
        upstream: Upstream,
        request: ChatRequest,
        body: dict[str, Any],
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.state = state
        self.request_id = request_id
        self.identity = identity
        self.model = model
        self.upstream = upstream
        self.request = request
        self.body = body
        self.started = time.perf_counter()
        self.client_gone = False
        self.finishing = False
        self.response: aiohttp.ClientResponse | None = None
        self.extra_headers: list[tuple[bytes, bytes]] = []

    async def run(self, payload: bytes) -> None:
        task = asyncio.current_task()
        assert task is not None
        # The body is consumed, so the next ASGI message is the disconnect: watching for it lets
        # a client that goes away cancel the upstream request at once.
        watcher = asyncio.ensure_future(self.receive())

        def on_disconnect(done: asyncio.Future[Any]) -> None:
            if not self.finishing and not done.cancelled() and done.exception() is None:
                self.client_gone = True
                task.cancel()

        watcher.add_done_callback(on_disconnect)
        try:
            if self.request.stream:
                await self._stream(payload)
            else:
                await self._complete(payload)
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
            task.uncancel()
        finally:
            self.finishing = True
            watcher.cancel()
            if self.response is not None:
                # Closing (not releasing) drops the connection, so the upstream stops generating.
                self.response.close()
            if self.state.meter.holds(self.request_id):
                # A path that metered nothing (an unexpected error): release the hold unused,
                # or the worker's lease would keep it until the process ends.
                event = self._event("error", 500)
                event.prompt_tokens = event.completion_tokens = 0
                self.state.meter.settle(event, wait=False)

    async def _open(self, payload: bytes) -> aiohttp.ClientResponse:
        session = self.state.upstreams.session
        assert session is not None
        headers = dict(self.upstream.headers)
        headers["x-request-id"] = self.request_id
        try:
            response = await session.post(self.upstream.chat_url, data=payload, headers=headers)
        except asyncio.CancelledError:
            if self.client_gone:
                self._meter_cancelled(prompt_tokens=None, relayed=None)
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._meter_failure("upstream_unreachable", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' could not be reached ({type(exc).__name__}); "
                "retry later.",
                code="upstream_unreachable",
            ) from None
        self.response = response
        if response.status != 200:
            error = await self._upstream_error(response)
            self._meter_failure("upstream_error", error.status_code)
            raise error
        return response

    async def _upstream_error(self, response: aiohttp.ClientResponse) -> DubheError:
        try:
            raw = await response.content.read(_MAX_ERROR_BODY)
            detail = orjson.loads(raw).get("error", {})
            message = detail.get("message") if isinstance(detail, dict) else None
        except Exception:
            message = None
        status = response.status
        if status in (400, 404, 413, 422) and message:
            # The upstream refused something the client sent through (an unknown extra field).
            return InvalidRequest(
                f"The upstream rejected the request: {message}", code="upstream_rejected"
            )
        return UpstreamError(
            f"The upstream for '{self.model.id}' answered with HTTP {status}"
            + (f" ({message})" if message else "")
            + "; retry with exponential backoff.",
            code="upstream_error",
        )

    # -- non-streaming -----------------------------------------------------------------------

    async def _complete(self, payload: bytes) -> None:
        response = await self._open(payload)
        try:
            raw = await response.read()
            data = orjson.loads(raw)
        except asyncio.CancelledError:
            if self.client_gone:
                self._meter_cancelled(prompt_tokens=None, relayed=None)
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            self._meter_failure("upstream_unreachable", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' broke off its answer; retry later.",
                code="upstream_unreachable",
            ) from None
        if data.get("model") != self.model.id:
            data["model"] = self.model.id
            raw = orjson.dumps(data)
        usage = data.get("usage")
        event = self._event("ok", 200)
        if isinstance(usage, dict):
            event.prompt_tokens = usage.get("prompt_tokens")
            event.completion_tokens = usage.get("completion_tokens")
        if event.prompt_tokens is None or event.completion_tokens is None:
            event.prompt_tokens = event.completion_tokens = None
            event.messages = self.body["messages"]
            event.response = data
        # Settled (spooled) before the client sees the answer.
        self.finishing = True
        settled = self.state.meter.settle(event, wait=True)
        headers = self.extra_headers
        if isinstance(settled, SettleResult):
            headers = _balance_headers(settled.balance.tokens_remaining, settled.balance.balance_uusd)
            headers.append((b"x-dubhe-cost-usd", format_usd(settled.cost_uusd).encode()))
            headers.extend(h for h in self.extra_headers if h[0] == b"x-dubhe-max-tokens-clamped")
        await send_json(self.send, 200, raw, self.request_id, headers)

    # -- streaming ---------------------------------------------------------------------------

    async def _stream(self, payload: bytes) -> None:
        response = await self._open(payload)
        send = self.send
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *_SSE_HEADERS,
                    (b"x-request-id", self.request_id.encode()),
                    *self.extra_headers,
                ],
            }
        )
        relay = StreamRelay(
            public_model=self.model.id,
            upstream_model=self.upstream.upstream_model(self.model.id),
            strip_usage_nulls=not self.request.include_usage,
        )
        keepalive = _Keepalive(send, self.state.catalog.stream_keepalive_seconds)
        try:
            async for data in response.content.iter_any():
                ready = relay.feed(data)
                if ready:
                    keepalive.last_sent = time.monotonic()
                    await send({"type": "http.response.body", "body": ready, "more_body": True})
            interrupted = not relay.saw_done
        except asyncio.CancelledError:
            keepalive.stop()
            if self.client_gone:
                self._meter_stream(relay, "client_cancelled", 499, wait=False)
            raise
        except (TimeoutError, aiohttp.ClientError, OSError):
            interrupted = True
        keepalive.stop()
        if interrupted:
            self._meter_stream(relay, "stream_interrupted", 502, wait=False)
            error = UpstreamUnreachable(
                f"The upstream for '{self.model.id}' broke off the stream; retry the request.",
                code="upstream_error",
            )
            self.finishing = True
            await send(
                {"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n"}
            )
            return
        self.finishing = True
        settled = self._meter_stream(relay, "ok", 200, wait=True)
        tail = b""
        if self.request.include_usage and relay.usage_event is not None:
            if isinstance(settled, SettleResult):
                relay.usage_event["usage"]["cost_usd"] = format_usd(settled.cost_uusd)
            tail = b"data: " + orjson.dumps(relay.usage_event) + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    def _meter_stream(self, relay: StreamRelay, outcome: str, status: int, *, wait: bool) -> Any:
        event = self._event(outcome, status)
        usage = relay.usage
        if usage is not None:
            event.prompt_tokens = usage.get("prompt_tokens")
            event.completion_tokens = usage.get("completion_tokens")
        else:
            event.messages = self.body["messages"]
            event.relayed = relay.relayed_bytes
        return self.state.meter.settle(event, wait=wait)

    # -- metering of requests that produced no answer ----------------------------------------

    def _meter_failure(self, outcome: str, status: int) -> None:
        event = self._event(outcome, status)
        event.prompt_tokens = 0
        event.completion_tokens = 0
        self.state.meter.settle(event, wait=False)

    def _meter_cancelled(self, *, prompt_tokens: int | None, relayed: bytes | None) -> None:
        # The client left before any answer: the upstream may have read the prompt.
        event = self._event("client_cancelled", 499)
        event.prompt_tokens = prompt_tokens
        event.completion_tokens = 0
        event.messages = self.body["messages"]
        self.state.meter.settle(event, wait=False)

    def _event(self, outcome: str, status: int) -> UsageEvent:
        return UsageEvent(
            request_id=self.request_id,
            user_id=self.identity.user_id,
            api_key_id=self.identity.key_id,
            model=self.model.id,
            upstream=self.upstream.spec.name,
            stream=self.request.stream,
            outcome=outcome,
            status_code=status,
            latency_ms=int((time.perf_counter() - self.started) * 1000),
            created_at=utcnow(),
        )


class _Keepalive:
    """Sends ``: ping`` comments while the upstream is silent, so proxies keep the stream open."""

    def __init__(self, send: Send, interval: float) -> None:
        self._send = send
        self._interval = interval
        self.last_sent = time.monotonic()
        self._stopped = False
        self._handle = asyncio.get_running_loop().call_later(interval, self._tick)
        self._pinging: asyncio.Task[None] | None = None

    def _tick(self) -> None:
        if self._stopped:
            return
        if time.monotonic() - self.last_sent >= self._interval and self._pinging is None:
            self._pinging = asyncio.ensure_future(self._ping())
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._tick)

    async def _ping(self) -> None:
        try:
            if not self._stopped:
                self.last_sent = time.monotonic()
                await self._send({"type": "http.response.body", "body": _PING, "more_body": True})
        finally:
            self._pinging = None

    def stop(self) -> None:
        self._stopped = True
        self._handle.cancel()
