"""One chat completion, whatever carries it: admission, the upstream call and settlement.

``ChatCompletion`` knows nothing of HTTP framing, so the SSE/JSON handler (``chat.py``) and the
WebSocket endpoint (``ws.py``) drive the same object:

1. ``admit(raw)`` (or ``admit_body``) parses and validates the body, picks the model and the
   deployments able to take the request, sizes the hold for the most expensive of them and
   reserves it with the meter; it raises ``DubheError`` for anything refused (nothing is held).
2. Either ``complete()`` (one JSON answer, settled before it is returned) or ``open_stream()``
   (calls the upstream, then returns an async iterator of whole SSE events as the upstream sent
   them; when it ends the request is settled and ``stream_end`` holds the usage chunk and the
   settlement). Both fail over to another deployment while nothing has reached the client
   (``_call``), so HTTP and the WebSocket get the same routing. An upstream failure is a
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
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, NoReturn

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
from dubhe.immutable import immutable
from dubhe.models.base import utcnow
from dubhe.providers import anthropic
from dubhe.providers.errors import redact_upstream_message
from dubhe.providers.http import ConnectFailed, HttpError, Response
from dubhe.routing import backoff_seconds
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


_PING = b": ping\n\n"


class _Retryable(Exception):  # noqa: N818 (a signal between two methods, not an error shown)
    """An attempt failed before anything reached the client: another deployment may answer.
    ``error`` is what the client gets if none does."""

    def __init__(self, error: DubheError, outcome: str, retry_after: float | None = None, *,
                 retry_same: bool = True, by_request: bool = True) -> None:  # fmt: skip
        super().__init__(outcome)
        self.error = error
        self.outcome = outcome
        self.retry_after = retry_after
        # What the request sent could have caused it (a 5xx, a timeout, a broken answer); not a
        # refused connection, credential or model name, which fail whatever is sent.
        self.by_request = by_request
        # Worth a second try on the same deployment (a 5xx, a timeout); not a refused
        # credential or a redirect, which only another deployment can get past.
        self.retry_same = retry_same


@immutable
class Settled:
    """What a finished request was charged, and where the account stands after it."""

    prompt_tokens: int
    completion_tokens: int
    cost_uusd: int
    balance: Balance
    # Dubhe's own count replaced the upstream's usage (missing or not believable).
    estimated: bool


@immutable
class Completed:
    """A non-streaming answer: the upstream's JSON (model renamed to the public id)."""

    body: bytes
    settled: Settled | None


@immutable
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
        # Asked when the answer is settled, where the transport can tell without a watcher.
        self.client_gone: Callable[[], bool] | None = None
        self.stream_end: StreamEnd | None = None
        self._response: Response | None = None
        self._relay: StreamRelay | None = None
        # The request's hold on its rate limits (chat.py), if it is limited.
        self.ticket: Ticket | None = None
        self._abandoning: asyncio.Future[Settled | None] | None = None
        # Routing: the deployments this request may land on (capable of it, best tier first),
        # each distinct payload with the per-choice limit it was built for, and that limit.
        self._candidates: tuple[Upstream, ...] = ()
        self._body_bytes = 0
        self._payloads: dict[tuple[str, str, tuple[str, ...]], tuple[int, bytes]] = {}
        self.per_choice = 0
        self._answer: dict[str, Any] = {}  # a non-streaming answer, parsed
        self._translator: anthropic.StreamTranslator | None = None
        self._first_task: asyncio.Future[tuple[Response, bytes]] | None = None
        # A stream started at its first keep-alive, still waiting for its first events.
        self._committed: (
            tuple[asyncio.Future[tuple[Response, bytes]], float] | None
        ) = None

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
        self._body_bytes = body_bytes
        model = self.model = _resolve_model(body, self.identity, state)
        request = self.request = validate_chat_request(body, model)
        if model.status == "maintenance" or model.id in state.maintenance:
            raise ServiceUnavailable(
                f"The model '{model.id}' is under maintenance; retry later.",
                code="model_maintenance",
                headers={"retry-after": "60"},
            )
        deployments = state.upstreams.for_model(model.id)
        if not deployments:
            raise ServiceUnavailable(
                f"No upstream is configured for '{model.id}'; retry later or contact the operator.",
                code="no_healthy_upstream",
                headers={"retry-after": "30"},
            )
        candidates = _capable(deployments, body, request, model)
        self.upstream = candidates[0]
        # The hold is sized for the most expensive deployment the request may land on: each
        # distinct payload (kind, upstream model name, limit fields) is sized once.
        per_choice = 0
        for deployment in candidates:
            key = _payload_key(deployment, model.id)
            if key in self._payloads:
                continue
            sizing = await admission.size(
                body, request, model, deployment.spec, body_bytes=body_bytes
            )
            self._payloads[key] = (sizing.per_choice, sizing.payload)
            if sizing.estimate is not None:
                self._estimate = sizing.estimate
            per_choice = sizing.per_choice if not per_choice else min(per_choice, sizing.per_choice)
            self.prompt_bound = max(self.prompt_bound, sizing.prompt_bound)
        candidates = await self._fitting(candidates, per_choice, body_bytes)
        self._candidates = candidates
        if self.ticket is not None:
            # Tokens per minute count what is held, before any credit is: a 429 holds nothing.
            await self.ticket.take_tokens(self.prompt_bound + per_choice * request.n)
        try:
            held = await state.meter.reserve(
                user_id=self.identity.user_id,
                request_id=self.request_id,
                api_key_id=self.identity.key_id,
                model=model.id,
                prompt_tokens=self.prompt_bound,
                max_tokens=per_choice,
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
            raise _insufficient_quota(held, self.prompt_bound + request.n)
        self.balance = held.balance
        if held.admission.clamped:
            # Each choice's limit is what the account can pay for; the upstream is told that one
            # (each payload is re-serialised with it when its deployment is tried).
            self.clamped_to = per_choice = held.admission.max_tokens
        self.per_choice = per_choice
        self.output_limit = per_choice * request.n

    async def _fitting(
        self, candidates: tuple[Upstream, ...], per_choice: int, body_bytes: int
    ) -> tuple[Upstream, ...]:
        """The deployments whose own context window takes the prompt and the output limit (by
        the bound first; the best estimate only where the bound does not fit)."""
        if all(d.spec.context_window is None for d in candidates):
            return candidates
        fitting = []
        for deployment in candidates:
            window = deployment.spec.context_window
            if window is None or self.prompt_bound + per_choice <= window:
                fitting.append(deployment)
                continue
            if await self._prompt_estimate() + per_choice <= window:
                fitting.append(deployment)
        if not fitting:
            largest = max(d.spec.context_window or 0 for d in candidates)
            estimate = await self._prompt_estimate()
            raise UnprocessableRequest(
                f"This model's maximum context length is {largest} tokens. However, you "
                f"requested {estimate + per_choice} tokens ({estimate} in the messages, "
                f"{per_choice} in the completion). Shorten the messages or lower max_tokens.",
                code="context_length_exceeded",
                param="messages",
            )
        return tuple(fitting)

    # -- the upstream call: attempts on deployments, before anything reaches the client ------

    def _payload(self, upstream: Upstream) -> bytes:
        per_choice, payload = self._payloads[_payload_key(upstream, self.model.id)]
        if per_choice != self.per_choice:
            payload = admission.upstream_payload(
                self.body, self.request, self.model, upstream.spec, self.per_choice
            )
        return payload

    async def _call(self) -> tuple[Response | None, bytes]:
        """Attempts until a deployment answers: a non-streaming answer whole, a stream up to its
        first events (or its first keep-alive, see ``_first_events``). A failure that leaves the
        client nothing (connect errors, timeouts, 429, 5xx, a broken or empty answer, a stream's
        own error event before any other) is retried on another deployment where one is usable,
        after a jittered backoff; the answer that returns is the only one metered. Raises ``DubheError`` when none answered."""
        router = self.state.router
        catalog = self.state.catalog
        failed: set[Upstream] = set()
        last: _Retryable | None = None
        for attempt in range(1, catalog.upstream_max_attempts + 1):
            now = time.monotonic()
            upstream = router.choose(self._candidates, failed, now)
            if upstream is None and last is not None and last.retry_same:
                # No other deployment: the one that failed may answer a second time.
                upstream = router.choose(self._candidates, failed - {self.upstream}, now)
            if upstream is None:
                break
            if attempt > 1:
                await asyncio.sleep(backoff_seconds(attempt - 1))
            self.upstream = upstream
            try:
                if self.streaming:
                    response, first = await self._attempt_stream(upstream)
                else:
                    response, first = await self._attempt(upstream)
            except _Retryable as failure:
                upstream.breaker.failed(time.monotonic(), failure.retry_after,
                                        account=self._account(failure.by_request))
                failed.add(upstream)
                last = failure
                self._relay = self._translator = None  # nothing of it reached the client
                if self._response is not None:
                    self._response.close()
                    self._response = None
                continue
            except DubheError as error:
                # The upstream refused what the client sent: it is healthy, the request is not.
                upstream.breaker.succeeded()
                self._meter_failure("upstream_error", error.status_code)
                raise
            if response is not None:
                upstream.breaker.succeeded()  # a committed stream reports when its events come
            return response, first
        self._exhausted(last)

    def _exhausted(self, last: _Retryable | None) -> NoReturn:
        """No attempt answered. Nothing was tried (every deployment is down or paused): 503.
        Else the last failure's own error (500 for the upstream's error status, 502 when it
        could not be reached), with the upstream's ``retry-after`` where it gave one."""
        if last is None:
            wait = max(1, math.ceil(self.state.router.soonest_retry(self._candidates,
                                                                    time.monotonic())))  # fmt: skip
            self._meter_failure("no_healthy_upstream", 503)
            raise ServiceUnavailable(
                f"Every upstream of '{self.model.id}' is down or paused; retry in {wait} s.",
                code="no_healthy_upstream",
                headers={"retry-after": str(wait)},
            )
        error = last.error
        if last.retry_after:
            error.headers["retry-after"] = str(math.ceil(last.retry_after))
        self._meter_failure(last.outcome, error.status_code)
        raise error

    async def _post(self, upstream: Upstream) -> Response:
        client = self.state.upstreams.client
        assert client is not None
        try:
            # Redirects are not followed: a 3xx is an upstream error, and neither the prompt nor
            # the upstream's key is ever sent to an address the operator did not configure.
            response = await client.post(
                upstream.endpoint,
                self._payload(upstream),
                b"x-request-id: %s\r\n" % self.request_id.encode(),
                upstream.timeout,
            )
        except (TimeoutError, HttpError, OSError) as exc:
            log.warning("upstream %s unreachable for %s: %s",
                        upstream.spec.name, self.request_id, exc or type(exc).__name__)  # fmt: skip
            connecting = isinstance(exc, ConnectFailed)
            raise _Retryable(self._unreachable(f"could not be reached ({type(exc).__name__})"),
                             "upstream_unreachable", by_request=not connecting) from None  # fmt: skip
        self._response = response
        if response.status != 200:
            error = await self._upstream_error(response)
            if isinstance(error, InvalidRequest):
                raise error
            retry_after = _retry_after(response)
            # A 401/403 (its credential), a 404 (its model name or path) or a 3xx will not
            # change on a second try there, nor with anything a client sends.
            raise _Retryable(error, "upstream_error", retry_after,
                             retry_same=response.status >= 429,
                             by_request=response.status >= 429)  # fmt: skip
        return response

    def _account(self, by_request: bool) -> int | None:
        """Whom the breaker holds to a failure (see ``routing/_breaker.py``)."""
        return self.identity.user_id if by_request else None

    def _unreachable(self, what: str) -> UpstreamUnreachable:
        return UpstreamUnreachable(
            f"The upstream for '{self.model.id}' {what}; retry later.",
            code="upstream_unreachable",
        )

    async def _attempt(self, upstream: Upstream) -> tuple[Response, bytes]:
        """A whole non-streaming answer, parsed (``_answer``), from an Anthropic deployment
        translated, and re-encoded with the public model's id."""
        response = await self._post(upstream)
        # Held whole, parsed and re-encoded: an upstream sending more could fill the worker's
        # memory.
        limit = self.state.catalog.max_upstream_answer_bytes
        try:
            raw = await response.read_up_to(limit + 1)
        except (TimeoutError, HttpError, OSError):
            raise _Retryable(self._unreachable("broke off its answer"),
                             "upstream_unreachable") from None  # fmt: skip
        if len(raw) > limit:
            # The rest is never read: close() drops the connection.
            log.warning("upstream %s answered %s with more than %d bytes",
                        upstream.spec.name, self.request_id, limit)  # fmt: skip
            raise _Retryable(self._unreachable("answered with more than Dubhe relays"),
                             "upstream_invalid")  # fmt: skip
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and upstream.spec.kind == "anthropic":
            data = anthropic.completion(data, self.model.id)
        if isinstance(data, dict) and not isinstance(data.get("choices"), list):
            # A JSON object is not yet an answer: an error envelope sent with a 200 would reach
            # the client verbatim (the upstream's own words, unredacted) and be charged.
            data = None
        if isinstance(data, dict):
            data["model"] = self.model.id
            try:
                raw = orjson.dumps(data)
            except orjson.JSONEncodeError:
                # Nested deeper than orjson writes (it reads 1024 levels, writes 254): an answer
                # Dubhe cannot relay is no answer, like one that is not JSON.
                data = None
        if not isinstance(data, dict):
            log.warning("upstream %s answered %s with a 200 that is not a chat completion: "
                        "%.200r", upstream.spec.name, self.request_id, raw)  # fmt: skip
            raise _Retryable(
                self._unreachable("answered with something that is not a chat completion"),
                "upstream_invalid",
            )
        self._answer = data
        return response, raw

    async def _attempt_stream(
        self, upstream: Upstream
    ) -> tuple[Response | None, bytes]:
        """Post and read up to the first events within the deployment's first-byte timeout. If
        the first keep-alive is due sooner, the attempt is committed instead: the stream starts
        (headers and a ping go out) and keeps waiting, and is no longer retried."""
        task = self._first_task = asyncio.ensure_future(self._first_events(upstream))
        keepalive = self.state.catalog.stream_keepalive_seconds
        wait = min(upstream.first_byte_timeout, keepalive)
        done, _ = await asyncio.wait({task}, timeout=wait)
        if not done:
            if upstream.first_byte_timeout <= keepalive:
                log.warning("upstream %s sent nothing within its first-byte timeout (%g s) for %s",
                            upstream.spec.name, upstream.first_byte_timeout,
                            self.request_id)  # fmt: skip
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, DubheError, _Retryable):
                    await task
                raise _Retryable(self._unreachable("sent nothing within its first-byte timeout"),
                                 "upstream_unreachable")  # fmt: skip
            self._committed = (task, upstream.first_byte_timeout - wait)
            return None, _PING
        response, first = task.result()
        return response, first

    async def _first_events(self, upstream: Upstream) -> tuple[Response, bytes]:
        response = await self._post(upstream)
        relay = self._new_relay(upstream)
        translator = self._translator
        try:
            async for data in response.chunks():
                if translator is not None:
                    data = translator.feed(data)
                ready = relay.feed(data)
                if relay.error_before_events:
                    break  # its own error before anything else: the client has nothing yet
                # Any valid event commits the request to this deployment, even if a fault or
                # the upstream's own error follows in the same read (then the stream ends with
                # the error frame after it): how TCP happened to cut the reads never decides
                # whether a started answer is thrown away.
                if ready or relay.saw_done:
                    return response, ready
                if relay.ended:
                    break
        except (TimeoutError, HttpError, OSError):
            raise _Retryable(self._unreachable("broke off the stream before its first event"),
                             "upstream_unreachable") from None  # fmt: skip
        why = relay.fault or relay.upstream_error_event.decode("utf-8", "replace") or "no events"
        log.warning("upstream %s failed the stream of %s before its first event: %s",
                    upstream.spec.name, self.request_id, why)  # fmt: skip
        raise _Retryable(
            UpstreamError(
                f"The upstream for '{self.model.id}' failed before its first event; retry with "
                "exponential backoff.",
                code="upstream_error",
            ),
            "upstream_error",
        )

    def _new_relay(self, upstream: Upstream) -> StreamRelay:
        anthropic_kind = upstream.spec.kind == "anthropic"
        self._translator = (
            anthropic.StreamTranslator(
                self.model.id, self.request_id, self.state.catalog.max_upstream_event_bytes
            )
            if anthropic_kind
            else None
        )
        self._relay = StreamRelay(
            public_model=self.model.id,
            upstream_model=self.model.id if anthropic_kind else upstream.upstream_model(self.model.id),
            strip_usage_nulls=not self.request.include_usage,
            max_event_bytes=self.state.catalog.max_upstream_event_bytes,
        )
        return self._relay

    async def _upstream_error(self, response: Response) -> DubheError:
        """Dubhe's own words for the upstream's failure; its message only where it tells the
        client what to fix, redacted. The upstream's full text goes to the log."""
        status = response.status
        try:
            # At most this much is read; the rest never is (close() drops the connection).
            raw = await response.read_up_to(self.state.catalog.max_upstream_error_bytes)
        except (TimeoutError, HttpError, OSError):
            raw = b""
        log.warning(
            "upstream %s answered HTTP %d to %s: %s",
            self.upstream.spec.name, status, self.request_id, raw.decode("utf-8", "replace"),
        )
        message = _error_message(raw)
        if status in (400, 413, 422) and message:
            # The upstream refused something the client sent through (an unknown extra field).
            # Not a 404: the client's path and model are Dubhe's, so an upstream that does not
            # know them is misconfigured (a wrong model name or base URL), and another
            # deployment may answer.
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
        _, raw = await self._call()
        data = self._answer  # its model already renamed to the public id, and re-encoded
        changed = False
        if self.client_gone is not None and self.client_gone():
            self.consumer_gone = True
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
        """Find a deployment that starts the stream (a refusal or failure of every one raises
        here, before anything is sent); then the events."""
        response, first = await self._call()
        return self._events(response, first)

    async def _events(
        self, response: Response | None, first: bytes
    ) -> AsyncGenerator[bytes, None]:
        """Whole SSE events as they arrive, minus the usage chunk and ``[DONE]`` (held back until
        the request is settled; then ``stream_end`` is set and the iterator ends)."""
        if first:
            yield first
        if response is None:
            # Committed at the first keep-alive: the deployment still owes its first events,
            # within what is left of its first-byte timeout; no other is tried now.
            assert self._committed is not None
            task, remaining = self._committed
            try:
                response, ready = await asyncio.wait_for(task, remaining)
            except (TimeoutError, _Retryable, DubheError):
                self.upstream.breaker.failed(time.monotonic(), account=self.identity.user_id)
                self._meter_failure("upstream_unreachable", 502)
                raise self._unreachable("sent nothing within its first-byte timeout") from None
            self.upstream.breaker.succeeded()
            if ready:
                yield ready
        relay = self._relay
        translator = self._translator
        assert relay is not None and response is not None
        interrupted = False
        if not relay.ended:
            # Comments (": keep-alive"), Anthropic's pings and the pieces of an event that
            # never ends keep the connection busy while carrying nothing for the client: the
            # idle timeout counts from the last read that completed an event with data.
            idle = self.upstream.timeout.read
            last_progress = time.monotonic()
            try:
                async for data in response.chunks():
                    if translator is not None:
                        data = translator.feed(data)
                    ready = relay.feed(data)
                    if ready.startswith(b"data:") or b"\ndata:" in ready:
                        last_progress = time.monotonic()
                    elif idle is not None and time.monotonic() - last_progress > idle:
                        log.warning("upstream %s sent no event with data for %g s in the "
                                    "stream of %s", self.upstream.spec.name, idle,
                                    self.request_id)  # fmt: skip
                        break  # interrupted: not relay.ended
                    if ready:
                        yield ready
                    if relay.ended:
                        break  # whatever an upstream sends after [DONE] is not relayed
                interrupted = not relay.ended
            except (TimeoutError, HttpError, OSError):
                interrupted = True
        if interrupted or relay.fault is not None:
            # Bytes already reached the client: never retried, but the breaker learns of it.
            self.upstream.breaker.failed(time.monotonic(), account=self.identity.user_id)
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
        if self._first_task is not None and not self._first_task.done():
            self._first_task.cancel()
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
                self.body, self.model, body_bytes=self._body_bytes
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


def _payload_key(upstream: Upstream, public_id: str) -> tuple[str, str, tuple[str, ...]]:
    """Deployments with the same key are sent the same bytes."""
    spec = upstream.spec
    kind = "anthropic" if spec.kind == "anthropic" else "openai"
    return kind, upstream.upstream_model(public_id), spec.output_limit_fields


def _capable(
    deployments: tuple[Upstream, ...], body: dict[str, Any], request: ChatRequest, model: ModelSpec
) -> tuple[Upstream, ...]:
    """The deployments that take what the request holds (images, tools, ``n`` > 1); the public
    model's own checks already passed. None of them: 422 naming what none takes."""
    tools = bool(body.get("tools") or body.get("functions"))
    if not (request.images or tools or request.n > 1):
        return deployments
    capable = tuple(
        deployment for deployment in deployments
        if not (request.images and deployment.spec.vision is False)
        and not (tools and deployment.spec.function_calling is False)
        and not (request.n > 1 and not deployment.spec.multiple_choices)
    )  # fmt: skip
    if capable:
        return capable
    if request.images and all(d.spec.vision is False for d in deployments):
        what, param = "images", "messages"
    elif tools and all(d.spec.function_calling is False for d in deployments):
        what, param = "tools", "tools" if body.get("tools") else "functions"
    elif request.n > 1:
        what, param = "more than one choice (n > 1)", "n"
    else:
        what, param = "this combination of images, tools and n", "messages"
    raise UnprocessableRequest(
        f"No upstream of the model '{model.id}' can take {what} at the moment; send the request "
        "without it.",
        code="unsupported_by_upstream",
        param=param,
    )


def _retry_after(response: Response) -> float | None:
    """The upstream's ``retry-after`` in seconds (a number; an HTTP date is not used)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None
