"""One chat completion, whatever carries it: admission, the upstream call and settlement.

``ChatCompletion`` knows nothing of HTTP framing, so the SSE/JSON handler (``chat.py``) and the
WebSocket endpoint (``ws.py``) drive the same object:

1. ``admit(raw)`` parses and validates the body, picks the model and upstream, sizes the hold and
   reserves it with the meter; it raises ``DubheError`` for anything refused (nothing is held then).
2. Either ``complete()`` (one JSON answer, settled before it is returned) or ``open_stream()``
   (calls the upstream, then returns an async iterator of whole SSE events as the upstream sent
   them; when it ends the request is settled and ``stream_end`` holds the usage chunk and the
   settlement). An upstream failure is a
   ``DubheError`` from either, raised after the request is metered.
3. ``abandon()`` when the consumer went away or cancelled (the transport cancels its task, then
   calls it): the request is charged for what was delivered. ``close()`` always, last: it drops
   the upstream connection and releases a hold that nothing metered.

Errors raised, as a tree (all ``DubheError``):

- before the upstream is called: ``InvalidRequest`` (400/404/422), ``InsufficientQuota`` (402),
  ``ServiceUnavailable`` (503: maintenance, no upstream, billing unreachable);
- from the upstream: ``UpstreamUnreachable`` (502: cannot connect, or it broke off its answer),
  ``UpstreamError`` (its own non-200 status), ``InvalidRequest`` (it refused what the client sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from sqlalchemy.exc import SQLAlchemyError

from dubhe.billing.caps import cap_message
from dubhe.billing.meter import Balance, Denied, SettleResult
from dubhe.billing.pricing import format_usd
from dubhe.billing.service import debt_message
from dubhe.errors import (
    AccountInDebt,
    DubheError,
    InsufficientQuota,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnprocessableRequest,
    UpstreamError,
    UpstreamUnreachable,
)
from dubhe.gateway import admission
from dubhe.gateway.relay import StreamRelay
from dubhe.gateway.validation import ChatRequest, validate_chat_request
from dubhe.models.base import utcnow
from dubhe.providers.errors import read_error_body, redact_upstream_message
from dubhe.usage import tokens
from dubhe.usage.events import UsageEvent
from dubhe.usage.reports import Untrusted, UsageReport, judge, parse_usage

if TYPE_CHECKING:
    from dubhe.catalog import ModelSpec
    from dubhe.gateway.app import GatewayState
    from dubhe.keys.cache import KeyIdentity
    from dubhe.providers import Upstream
    from dubhe.ratelimit import Ticket

log = logging.getLogger(__name__)

# Counting more generated text than this (bytes of an answer) moves to a worker thread, which
# tiktoken lets run in parallel (it releases the GIL): the event loop never stalls on it.
_COUNT_INLINE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Settled:
    """What a finished request was charged, and where the account stands after it."""

    prompt_tokens: int
    completion_tokens: int
    cost_uusd: int
    balance: Balance
    # Dubhe's own count replaced the upstream's usage (missing or not believable).
    estimated: bool


@dataclass(frozen=True, slots=True)
class Completed:
    """A non-streaming answer: the upstream's JSON (model renamed to the public id)."""

    body: bytes
    settled: Settled | None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream ended: the usage chunk to send if the client asked for one (``cost_usd``
    filled in), and the settlement."""

    usage_chunk: dict[str, Any] | None
    settled: Settled | None
    # The upstream's own error event was the stream's last one (relayed): no [DONE] follows.
    upstream_error: bool = False


# Settlements that outlive the request's own task (strong references: the loop keeps only weak).
_SETTLING: set[asyncio.Future[Settled | None]] = set()


class ChatCompletion:
    def __init__(self, state: GatewayState, request_id: str, identity: KeyIdentity) -> None:
        self.state = state
        self.request_id = request_id
        self.identity = identity
        self.started = time.perf_counter()
        # Set by admit():
        self.body: dict[str, Any] = {}
        self.request: ChatRequest
        self.model: ModelSpec
        self.upstream: Upstream
        self.balance: Balance
        self.clamped_to: int | None = None  # the per-choice output limit, when lowered
        self._estimate: int | None = None  # the prompt's best estimate, once counted
        self.prompt_bound = 0  # at most what any upstream can count for the prompt
        self.output_limit = 0  # output tokens held, over all choices
        # The consumer left, but the answer is still taken and charged (non-streaming: see
        # complete()).
        self.consumer_gone = False
        self.stream_end: StreamEnd | None = None
        self._payload = b""
        self._response: aiohttp.ClientResponse | None = None
        self._relay: StreamRelay | None = None
        # The request's hold on its rate limits (chat.py), if it is limited.
        self.ticket: Ticket | None = None
        self._abandoning: asyncio.Future[Settled | None] | None = None

    @property
    def streaming(self) -> bool:
        return self.request.stream

    # -- admission ---------------------------------------------------------------------------

    async def admit(self, raw: bytes) -> None:
        """Everything before the upstream call; raises ``DubheError`` for what is refused."""
        await self.admit_body(_parse_body(raw), len(raw))

    async def admit_body(self, body: dict[str, Any], body_bytes: int) -> None:
        """``admit`` for a body a transport has already decoded (a WebSocket event carries it
        inside its own JSON); ``body_bytes`` is its encoded size."""
        _check_body(body)
        state = self.state
        self.body = body
        model = self.model = _resolve_model(body, self.identity, state)
        request = self.request = validate_chat_request(body, model)
        if model.status == "maintenance" or model.id in state.maintenance:
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
        upstream = self.upstream = upstreams[0]
        # The hold: the prompt's bound plus each choice's output limit, n times (admission.py).
        sizing = await admission.size(body, request, model, upstream.spec, body_bytes=body_bytes)
        if self.ticket is not None:
            # Tokens per minute count what is held, before any credit is: a 429 holds nothing.
            await self.ticket.take_tokens(sizing.prompt_bound + sizing.per_choice * request.n)
        try:
            held = await state.meter.reserve(
                user_id=self.identity.user_id,
                request_id=self.request_id,
                api_key_id=self.identity.key_id,
                model=model.id,
                prompt_tokens=sizing.prompt_bound,
                max_tokens=sizing.per_choice,
                n=request.n,
                spend_cap_uusd=self.identity.spend_cap_uusd,
            )
        except (SQLAlchemyError, OSError) as exc:
            # Credit could not be leased (the database is unreachable): refuse rather than serve
            # unbilled, and say it is temporary.
            log.warning("admission of %s failed: %s", self.request_id, exc)
            raise ServiceUnavailable(
                "Your account's credit cannot be checked right now; retry shortly.",
                code="billing_unavailable",
                headers={"retry-after": "5"},
            ) from None
        if isinstance(held, Denied):
            raise _insufficient_quota(held, sizing.prompt_bound + request.n)
        self.balance = held.balance
        self._estimate = sizing.estimate
        # The usage rule judges a reported prompt count against the same bound the hold used.
        self.prompt_bound = sizing.prompt_bound
        self._payload = sizing.payload
        per_choice = sizing.per_choice
        if held.admission.clamped:
            # Each choice's limit is what the account can pay for; the upstream is told that one.
            self.clamped_to = per_choice = held.admission.max_tokens
            self._payload = admission.upstream_payload(
                body, request, model, upstream.spec, per_choice
            )
        self.output_limit = per_choice * request.n

    # -- the upstream call -------------------------------------------------------------------

    async def _open(self) -> aiohttp.ClientResponse:
        session = self.state.upstreams.session
        assert session is not None
        headers = dict(self.upstream.headers)
        headers["x-request-id"] = self.request_id
        try:
            # Redirects are not followed: a 3xx is an upstream error, and neither the prompt nor
            # the upstream's key is ever sent to an address the operator did not configure.
            response = await session.post(
                self.upstream.chat_url, data=self._payload, headers=headers, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._meter_failure("upstream_unreachable", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' could not be reached ({type(exc).__name__}); "
                "retry later.",
                code="upstream_unreachable",
            ) from None
        self._response = response
        if response.status != 200:
            error = await self._upstream_error(response)
            self._meter_failure("upstream_error", error.status_code)
            raise error
        return response

    async def _upstream_error(self, response: aiohttp.ClientResponse) -> DubheError:
        """Dubhe's own words for the upstream's failure; its message only where it tells the
        client what to fix, redacted. The upstream's full text goes to the log."""
        status = response.status
        try:
            raw = await read_error_body(response, self.state.catalog.max_upstream_error_bytes)
        except (TimeoutError, aiohttp.ClientError, OSError):
            raw = b""
        log.warning(
            "upstream %s answered HTTP %d to %s: %s",
            self.upstream.spec.name, status, self.request_id, raw.decode("utf-8", "replace"),
        )
        message = _error_message(raw)
        if status in (400, 404, 413, 422) and message:
            # The upstream refused something the client sent through (an unknown extra field).
            return InvalidRequest(
                f"The upstream rejected the request: {redact_upstream_message(message)}",
                code="upstream_rejected",
            )
        if 300 <= status < 400:
            what = f"a redirect (HTTP {status}), which Dubhe does not follow"
        else:
            what = f"HTTP {status}"
        return UpstreamError(
            f"The upstream for '{self.model.id}' answered with {what}; retry with exponential "
            "backoff.",
            code="upstream_error",
        )

    # -- non-streaming -----------------------------------------------------------------------

    async def complete(self) -> Completed:
        """The whole answer, settled (spooled) before it is returned. A consumer that leaves
        meanwhile does not cancel it: the upstream finishes the bounded request (its output
        limit is held) and the answer is charged on its usage, exactly as if it had stayed."""
        response = await self._open()
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            self._meter_failure("upstream_unreachable", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' broke off its answer; retry later.",
                code="upstream_unreachable",
            ) from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            log.warning("upstream %s answered %s with a 200 that is not a JSON object: %.200r",
                        self.upstream.spec.name, self.request_id, raw)  # fmt: skip
            self._meter_failure("upstream_invalid", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' answered with something that is not a chat "
                "completion; retry later.",
                code="upstream_unreachable",
            )
        changed = data.get("model") != self.model.id
        if changed:
            data["model"] = self.model.id
        outcome, status = ("client_cancelled", 499) if self.consumer_gone else ("ok", 200)
        event = self._event(outcome, status)
        report = parse_usage(data.get("usage"))
        if isinstance(report, UsageReport):
            verdict = judge(
                report,
                prompt_bound=self.prompt_bound,
                visible_bytes=tokens.visible_output_bytes(data),
                # What was asked for: extra choices an upstream adds earn no overhead allowance.
                choices=self.request.n,
                output_limit=self.output_limit,
            )
            report = verdict or report
        if isinstance(report, UsageReport):
            event.prompt_tokens = report.prompt_tokens
            event.completion_tokens = report.completion_tokens
        else:
            event.prompt_tokens = await self._prompt_count(report)
            if len(raw) > _COUNT_INLINE_BYTES:
                event.completion_tokens = await asyncio.to_thread(
                    tokens.count_completion_message, data
                )
            else:
                event.completion_tokens = tokens.count_completion_message(data)
            self._estimated(event, report)
            # The client sees the counts it is charged for, not the upstream's.
            data["usage"] = _usage_object(event.prompt_tokens, event.completion_tokens)
            changed = True
        if changed:
            raw = orjson.dumps(data)
        return Completed(raw, self._settle(event))

    # -- streaming ---------------------------------------------------------------------------

    async def open_stream(self) -> AsyncGenerator[bytes, None]:
        """Call the upstream (its refusal raises here, before anything is sent); then the events."""
        response = await self._open()
        self._relay = StreamRelay(
            public_model=self.model.id,
            upstream_model=self.upstream.upstream_model(self.model.id),
            strip_usage_nulls=not self.request.include_usage,
            max_event_bytes=self.state.catalog.max_upstream_event_bytes,
        )
        return self._events(response, self._relay)

    async def _events(
        self, response: aiohttp.ClientResponse, relay: StreamRelay
    ) -> AsyncGenerator[bytes, None]:
        """Whole SSE events as they arrive, minus the usage chunk and ``[DONE]`` (held back until
        the request is settled; then ``stream_end`` is set and the iterator ends)."""
        try:
            async for data in response.content.iter_any():
                ready = relay.feed(data)
                if ready:
                    yield ready
                if relay.ended:
                    break  # whatever an upstream sends after [DONE] is not relayed
            interrupted = not relay.ended
        except (TimeoutError, aiohttp.ClientError, OSError):
            interrupted = True
        if relay.fault is not None:
            log.warning("upstream %s broke the stream of %s: %s",
                        self.upstream.spec.name, self.request_id, relay.fault)  # fmt: skip
            await self._settle_stream(relay, "upstream_invalid", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' sent an invalid stream event; retry the "
                "request.",
                code="upstream_error",
            ) from None
        if relay.upstream_error:
            log.warning("upstream %s sent an error event in the stream of %s: %s",
                        self.upstream.spec.name, self.request_id,
                        relay.upstream_error_event.decode("utf-8", "replace"))  # fmt: skip
            settled = await self._settle_stream(relay, "upstream_error", 502)
            self.stream_end = StreamEnd(None, settled, upstream_error=True)
            return
        if interrupted:
            await self._settle_stream(relay, "stream_interrupted", 502)
            raise UpstreamUnreachable(
                f"The upstream for '{self.model.id}' broke off the stream; retry the request.",
                code="upstream_error",
            )
        settled = await self._settle_stream(relay, "ok", 200)
        usage_chunk = None
        if self.request.include_usage and settled is not None:
            usage_chunk = relay.usage_event or {
                "id": f"chatcmpl-{self.request_id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model.id,
                "choices": [],
            }
            usage = usage_chunk.get("usage")
            if settled.estimated or not isinstance(usage, dict):
                usage = _usage_object(settled.prompt_tokens, settled.completion_tokens)
            usage_chunk["usage"] = {**usage, "cost_usd": format_usd(settled.cost_uusd)}
        self.stream_end = StreamEnd(usage_chunk, settled)

    # -- the end -----------------------------------------------------------------------------

    async def abandon(self) -> Settled | None:
        """The consumer went away (or cancelled): charge what was delivered (the prompt, which
        the upstream may have read, and for a stream what was relayed). Returns the charge, or
        None when the request was already metered or nothing was held. The charge runs to its
        end in a task of its own: a caller cancelled meanwhile (a socket closing cancels its
        requests) does not leave the request unsettled, and a second call waits for the same."""
        return await asyncio.shield(self._start_abandon())

    def _start_abandon(self) -> asyncio.Future[Settled | None]:
        if self._abandoning is None:
            self._abandoning = asyncio.ensure_future(self._abandon())
            _SETTLING.add(self._abandoning)
            self._abandoning.add_done_callback(_SETTLING.discard)
        return self._abandoning

    async def _abandon(self) -> Settled | None:
        if not self.state.meter.holds(self.request_id):
            return None
        if self._relay is not None:
            return await self._settle_stream(self._relay, "client_cancelled", 499)
        event = self._event("client_cancelled", 499)
        event.prompt_tokens = await self._prompt_estimate()
        event.completion_tokens = 0
        self._estimated(event, Untrusted("the client left before the answer"))
        return self._settle(event)

    def close(self) -> None:
        if self._response is not None:
            # Closing (not releasing) drops the connection, so the upstream stops generating.
            self._response.close()
        if not self.state.meter.holds(self.request_id):
            return
        if self._abandoning is not None or (self._relay is not None and self._relay.relayed_size):
            # Something was delivered (or is being charged): it is charged, never released
            # unused, whatever path ended here (a task cancelled in the middle of settling).
            self._start_abandon()
            return
        # A path that metered nothing and delivered nothing (an unexpected error): release the
        # hold unused, or the worker's lease would keep it until the process ends.
        event = self._event("error", 500)
        event.prompt_tokens = event.completion_tokens = 0
        self.state.meter.settle(event, wait=False)

    # -- metering ----------------------------------------------------------------------------

    async def _prompt_estimate(self) -> int:
        """The prompt's best estimate, what Dubhe charges when the upstream's count is not used:
        counted at admission only if the context check needed it, else now (rarely)."""
        if self._estimate is None:
            self._estimate = await admission.estimate_prompt(
                self.body, self.model, body_bytes=len(self._payload)
            )
        return self._estimate

    async def _prompt_count(self, why: Untrusted) -> int:
        """The prompt count charged when the upstream's usage was not believed: its own prompt
        count where that passed its check (only the completion count was refused), else
        Dubhe's estimate."""
        return why.prompt_tokens if why.prompt_tokens is not None else await self._prompt_estimate()

    def _estimated(self, event: UsageEvent, why: Untrusted) -> None:
        event.usage_source = "estimated"
        level = logging.INFO if why.reason == "no usage reported" else logging.WARNING
        log.log(level, "usage of %s from upstream %s is Dubhe's own count: %s",
                self.request_id, self.upstream.spec.name, why.reason)  # fmt: skip

    def _settle(self, event: UsageEvent) -> Settled | None:
        # Counts are always filled in by now, so the meter never tokenizes on the event loop.
        result = self.state.meter.settle(event, wait=True)
        if not isinstance(result, SettleResult):
            return None
        return Settled(
            prompt_tokens=event.prompt_tokens or 0,
            completion_tokens=event.completion_tokens or 0,
            cost_uusd=result.cost_uusd,
            balance=result.balance,
            estimated=event.usage_source == "estimated",
        )

    async def _settle_stream(self, relay: StreamRelay, outcome: str, status: int) -> Settled | None:
        """Charge a stream on the upstream's usage if it is believable, else on Dubhe's count of
        the prompt and of every generated token relayed."""
        event = self._event(outcome, status)
        report = relay.usage
        if isinstance(report, UsageReport):
            report = judge(
                report,
                prompt_bound=self.prompt_bound,
                # Every visible byte was relayed inside a JSON string, which never encodes text
                # in fewer bytes than UTF-8: a sound bound that costs nothing per chunk...
                visible_bytes=relay.relayed_size,
                choices=self.request.n,
                output_limit=self.output_limit,
            ) or report
        if isinstance(report, UsageReport) and _implausibly_dense(report, relay.relayed_size):
            # ...but a loose one: each event's framing is bytes that carry no text, and padding
            # an event costs a lying upstream nothing. A count denser than honest streams ever
            # are is held against the bytes of text actually relayed (parsed now, once).
            report = judge(
                report,
                prompt_bound=self.prompt_bound,
                visible_bytes=(await relay.measured())[1],
                choices=self.request.n,
                output_limit=self.output_limit,
            ) or report
        if isinstance(report, UsageReport):
            relay.forget_counts()
            event.prompt_tokens = report.prompt_tokens
            event.completion_tokens = report.completion_tokens
        else:
            report = report or Untrusted("no usage reported")
            event.prompt_tokens = await self._prompt_count(report)
            event.completion_tokens = await relay.completion_tokens()
            self._estimated(event, report)
        return self._settle(event)

    def _meter_failure(self, outcome: str, status: int) -> None:
        event = self._event(outcome, status)
        event.prompt_tokens = 0
        event.completion_tokens = 0
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


def _usage_object(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error_message(raw: bytes) -> str | None:
    """The ``error.message`` of an OpenAI error envelope, if the body is one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    detail = body.get("error") if isinstance(body, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else None
    return message if isinstance(message, str) and message else None


def _insufficient_quota(denied: Denied, least_tokens: int) -> InsufficientQuota:
    if denied.debt_uusd:
        return AccountInDebt(debt_message(denied.debt_uusd))
    if denied.cap_uusd is not None:
        return InsufficientQuota(cap_message(denied.cap_uusd))
    return InsufficientQuota(
        "Your plan's included tokens and prepaid balance cannot cover this request: "
        f"{denied.balance.tokens_remaining} included tokens and "
        f"${format_usd(denied.balance.balance_uusd)} are available now (credit held for your "
        "other requests in flight is not, and returns seconds after they end), and it needs at "
        f"least {least_tokens} tokens (the prompt plus one per choice). Recharge your balance or "
        "upgrade your plan in the dashboard."
    )


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
    return body


def _check_body(body: dict[str, Any]) -> None:
    for field in ("model", "messages"):
        if body.get(field) is None:
            raise InvalidRequest(
                f"Missing required parameter: '{field}'.",
                code="missing_required_parameter",
                param=field,
            )


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


# An honest stream relays at least this many bytes per visible token (one OpenAI chunk event
# carrying one token is over 100 bytes; a server that batches several tokens per event still
# frames each batch). A report denser than this is checked against the text actually relayed.
_MIN_STREAM_BYTES_PER_TOKEN = 24


def _implausibly_dense(report: UsageReport, relayed_size: int) -> bool:
    visible = report.completion_tokens - report.hidden_reasoning_tokens
    return visible * _MIN_STREAM_BYTES_PER_TOKEN > relayed_size
