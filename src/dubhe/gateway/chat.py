"""``POST /v1/chat/completions`` over HTTP: JSON or SSE framing around ``ChatCompletion``.

Per request: a BLAKE2b and two dict lookups for the key, one orjson parse, validation of the fields
Dubhe owns, one upstream call on the worker's keep-alive client, and a byte-level relay (all in
``completion.py``, which no transport detail reaches). This module reads the body, watches for
the client's disconnect, frames the answer and keeps a silent stream alive.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import orjson

from dubhe.billing.meter import Balance
from dubhe.billing.pricing import format_usd
from dubhe.errors import DubheError
from dubhe.gateway.asgi import (
    CONNECTION_SCOPE_KEY,
    ClientGone,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_json,
)
from dubhe.gateway.completion import ChatCompletion, Settled
from dubhe.metrics.requests import FACTS_SCOPE_KEY

if TYPE_CHECKING:
    from dubhe.gateway.app import GatewayState

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PING = b": ping\n\n"
RATE_LIMIT_SCOPE_KEY = "dubhe.ratelimit"
_DONE = b"data: [DONE]\n\n"


async def chat_completions(
    scope: Scope, receive: Receive, send: Send, state: GatewayState, request_id: str
) -> None:
    identity = await state.keys.authenticate(header(scope, b"authorization"))
    catalog = state.catalog
    plan = catalog.plans.get(identity.plan_code) or catalog.plans[catalog.default_plan]
    # Concurrency and requests per minute, before the body is even read: a refusal is cheap.
    ticket = await state.limits.admit_key(identity, plan)
    scope[RATE_LIMIT_SCOPE_KEY] = ticket  # the error path adds its headers too
    exchange: _Exchange | None = None
    try:
        completion = ChatCompletion(state, request_id, identity)
        completion.ticket = ticket
        try:
            raw = await read_body(receive, catalog.max_request_bytes)
        except ClientGone:
            return
        await completion.admit(raw)
        exchange = _Exchange(completion, receive, send)
        await exchange.run(scope.get(CONNECTION_SCOPE_KEY))
    finally:
        # Tokens per minute count what was used, once it is known; otherwise what was held.
        # A request refused before the upstream call used none of what it held.
        ticket.finish(exchange.used_tokens if exchange is not None else 0)
        scope[FACTS_SCOPE_KEY] = (identity, completion,
                                  exchange.settled if exchange is not None else None)


def _balance_headers(balance: Balance) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-dubhe-tokens-remaining", str(balance.tokens_remaining).encode()),
        (b"x-dubhe-balance-usd", format_usd(balance.balance_uusd).encode()),
    ]


class _Exchange:
    """One admitted request over HTTP: the client's disconnect cancels it; the answer is framed."""

    def __init__(self, completion: ChatCompletion, receive: Receive, send: Send) -> None:
        self.completion = completion
        self.receive = receive
        self.send = send
        self.client_gone = False
        self.finishing = False
        # Prompt plus completion tokens charged, once settled (None: not known).
        self.used_tokens: int | None = None
        self.settled: Settled | None = None

    def _used(self, settled: Settled | None) -> None:
        if settled is not None:
            self.settled = settled
            self.used_tokens = settled.prompt_tokens + settled.completion_tokens

    def _headers(self, balance: Balance) -> list[tuple[bytes, bytes]]:
        headers = _balance_headers(balance)
        if self.completion.clamped_to is not None:
            headers.append((b"x-dubhe-max-tokens-clamped", str(self.completion.clamped_to).encode()))
        if self.completion.ticket is not None:
            headers.extend(self.completion.ticket.headers())
        return headers

    async def run(self, connection: Any = None) -> None:
        if connection is not None and not self.completion.streaming:
            # A non-streaming answer is generated whole either way (README, Billing): the
            # bounded request finishes and is charged what the upstream generated. Whether its
            # client is still there is read off the connection when it is settled, with no
            # task waiting in receive() meanwhile.
            def client_gone() -> bool:
                cycle = connection()
                return cycle is None or bool(cycle.disconnected)

            self.completion.client_gone = client_gone
            try:
                await self._complete()
            finally:
                self.finishing = True
                self.completion.close()
            return
        task = asyncio.current_task()
        assert task is not None
        # The body is consumed, so the next ASGI message is the disconnect: watching for it lets
        # a client that goes away cancel the upstream request at once.
        watcher = asyncio.ensure_future(self.receive())

        def on_disconnect(done: asyncio.Future[Any]) -> None:
            if self.finishing or done.cancelled() or done.exception() is not None:
                return
            if not self.completion.streaming:
                # A non-streaming answer is generated whole either way: let the bounded request
                # finish and charge what the upstream generated (README, Billing).
                self.completion.consumer_gone = True
                return
            self.client_gone = True
            task.cancel()

        watcher.add_done_callback(on_disconnect)
        try:
            if self.completion.streaming:
                await self._stream()
            else:
                await self._complete()
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
            task.uncancel()
            await self.completion.abandon()
        finally:
            self.finishing = True
            watcher.cancel()
            self.completion.close()

    async def _complete(self) -> None:
        completed = await self.completion.complete()
        self.finishing = True
        settled = completed.settled
        self._used(settled)
        headers = self._headers(settled.balance if settled else self.completion.balance)
        if settled is not None:
            headers.insert(2, (b"x-dubhe-cost-usd", format_usd(settled.cost_uusd).encode()))
        await send_json(self.send, 200, completed.body, self.completion.request_id, headers)

    async def _stream(self) -> None:
        completion = self.completion
        send = self.send
        events = await completion.open_stream()  # the upstream's refusal is still plain JSON
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    *_SSE_HEADERS,
                    (b"x-request-id", completion.request_id.encode()),
                    *self._headers(completion.balance),
                ],
            }
        )
        keepalive = _Keepalive(send, completion.state.catalog.stream_keepalive_seconds)
        try:
            async with aclosing(events):
                async for ready in events:
                    keepalive.last_sent = time.monotonic()
                    await send({"type": "http.response.body", "body": ready, "more_body": True})
        except DubheError as error:
            # Headers are sent: the error becomes the stream's last event.
            keepalive.stop()
            self.finishing = True
            await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n"})
            return
        finally:
            keepalive.stop()
        self.finishing = True
        end = completion.stream_end
        if end is not None:
            self._used(end.settled)
        if end is not None and end.upstream_error:
            # The upstream's own error event was relayed as the last one: nothing follows it.
            await send({"type": "http.response.body", "body": b""})
            return
        tail = b""
        if end is not None and end.usage_chunk is not None:
            tail = b"data: " + orjson.dumps(end.usage_chunk) + b"\n\n"
        await send({"type": "http.response.body", "body": tail + _DONE})


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
