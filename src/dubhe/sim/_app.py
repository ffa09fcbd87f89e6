"""The simulator as a raw ASGI application (no framework: it is a benchmark baseline)."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from dubhe.sim._answer import Answer, plan_answer
from dubhe.sim._directives import Directives, parse_directives
from dubhe.sim._disconnect import DisconnectWatcher, Receive
from dubhe.sim._errors import (
    InvalidRequest,
    SimulatedConnectionCut,
    error_body,
    simulated_status_body,
)
from dubhe.sim._render import ChunkEncoder, completion_body, stream_events
from dubhe.sim._stats import SimStats

Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON_HEADER = (b"content-type", b"application/json")
_SSE_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
}
_END_OF_BODY = {"type": "http.response.body", "body": b"", "more_body": False}

_INVALID_JSON = error_body(
    "We could not parse the JSON body of your request.",
    "invalid_request_error",
    code="invalid_json",
)
_NOT_AN_OBJECT = error_body(
    "The request body must be a JSON object.", "invalid_request_error", code="invalid_json"
)
_MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "dubhe-sim"}
            for model_id in ("sim-small", "sim-large")
        ],
    }
)

# An unpaced stream never awaits anything that suspends, so it yields to the
# event loop this often to let a disconnect be noticed on very long answers.
_YIELD_EVERY_EVENTS = 64


class _Outcome(enum.Enum):
    COMPLETED = enum.auto()
    DISCONNECTED = enum.auto()


class UpstreamSimulator:
    """OpenAI-compatible chat completions upstream; see the package docstring."""

    def __init__(self, *, tokens_per_second: float | None = None):
        if tokens_per_second is not None and tokens_per_second <= 0:
            raise ValueError("tokens_per_second must be positive (or None for unpaced)")
        self.stats = SimStats()
        self._token_interval = 1.0 / tokens_per_second if tokens_per_second else None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._route(scope["method"], scope["path"], receive, send)
        elif scope["type"] == "lifespan":
            await _run_lifespan(receive, send)

    async def _route(self, method: str, path: str, receive: Receive, send: Send) -> None:
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat_completion(receive, send)
        elif path == "/v1/models" and method == "GET":
            await _send_json(send, 200, _MODELS)
        elif path == "/sim/stats" and method == "GET":
            await _send_json(send, 200, orjson.dumps(self.stats.as_dict()))
        elif path == "/sim/reset" and method == "POST":
            self.stats.reset()
            await _send_json(send, 200, orjson.dumps(self.stats.as_dict()))
        else:
            body = error_body(
                f"Invalid URL ({method} {path})", "invalid_request_error", code="unknown_url"
            )
            await _send_json(send, 404, body)

    async def _chat_completion(self, receive: Receive, send: Send) -> None:
        stats = self.stats
        stats.requests += 1
        stats.active += 1
        try:
            outcome = await self._answer_chat(receive, send)
        except SimulatedConnectionCut:
            stats.cut += 1
            raise  # uvicorn then closes the connection (its log entry is filtered out)
        finally:
            stats.active -= 1
        if outcome is _Outcome.COMPLETED:
            stats.completed += 1
        else:
            stats.disconnected += 1

    async def _answer_chat(self, receive: Receive, send: Send) -> _Outcome:
        body = await _read_body(receive)
        if body is None:
            return _Outcome.DISCONNECTED
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _send_json(send, 400, _INVALID_JSON)
            return _Outcome.COMPLETED
        if not isinstance(request, dict):
            await _send_json(send, 400, _NOT_AN_OBJECT)
            return _Outcome.COMPLETED
        messages = request.get("messages")
        if not isinstance(messages, list):
            messages = []
        directives = parse_directives(messages)

        # Only requests that wait need to watch for a disconnect: an immediate
        # non-stream answer is written in one go.
        streaming = request.get("stream") is True
        watcher = DisconnectWatcher(receive) if streaming or directives.delay_ms else None
        try:
            if watcher is not None and await watcher.wait(directives.delay_ms / 1000):
                return _Outcome.DISCONNECTED
            if directives.status is not None:
                await _send_json(send, directives.status, simulated_status_body(directives.status))
                return _Outcome.COMPLETED
            try:
                answer = plan_answer(request, messages, directives)
            except InvalidRequest as invalid:
                await _send_json(
                    send,
                    400,
                    error_body(invalid.message, "invalid_request_error",
                               param=invalid.param, code=invalid.code),
                )  # fmt: skip
                return _Outcome.COMPLETED

            completion_id = f"chatcmpl-sim-{random.getrandbits(96):024x}"
            created = int(time.time())
            model = request.get("model", "")
            if not streaming:
                await _send_completion(send, completion_body(completion_id, created, model, answer),
                                       directives)  # fmt: skip
                return _Outcome.COMPLETED
            assert watcher is not None
            stream_options = request.get("stream_options")
            include_usage = (
                isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            )
            encoder = ChunkEncoder(completion_id, created, model, include_usage)
            return await self._stream(send, watcher, encoder, answer, include_usage, directives)
        finally:
            if watcher is not None:
                watcher.close()

    async def _stream(
        self,
        send: Send,
        watcher: DisconnectWatcher,
        encoder: ChunkEncoder,
        answer: Answer,
        include_usage: bool,
        directives: Directives,
    ) -> _Outcome:
        """Send one ASGI body message per SSE event so the client sees real chunking.

        ``cut_after=N`` counts every SSE event sent: the role chunk is #1, then one
        per token (or tool-argument fragment), the finish chunk, the usage chunk
        (if asked for) and ``data: [DONE]``. After N of them the connection drops
        without the terminating chunk — even when N covers the whole stream.
        """
        await send(_SSE_START)
        cut_after = directives.cut_after
        interval = self._token_interval
        loop = asyncio.get_running_loop()
        next_token_at = loop.time()
        sent = 0
        for event, is_token in stream_events(encoder, answer, include_usage):
            if interval is not None and is_token:
                # Pace against a schedule, not by sleeping `interval` each time,
                # so per-event overhead does not slow the advertised rate.
                next_token_at += interval
                if await watcher.wait(next_token_at - loop.time()):
                    return _Outcome.DISCONNECTED
            elif sent % _YIELD_EVERY_EVENTS == _YIELD_EVERY_EVENTS - 1:
                await asyncio.sleep(0)
            if watcher.client_gone:
                return _Outcome.DISCONNECTED
            if cut_after is not None and sent >= cut_after:
                raise SimulatedConnectionCut
            await send({"type": "http.response.body", "body": event, "more_body": True})
            sent += 1
        if cut_after is not None:
            raise SimulatedConnectionCut
        await send(_END_OF_BODY)
        return _Outcome.COMPLETED


async def _send_completion(send: Send, body: bytes, directives: Directives) -> None:
    """Send a non-stream body; with cut_after, promise all of it but deliver half.

    Announcing the full content-length and then dropping the connection is what a
    truncated upstream response looks like; failing before the response started
    would instead make uvicorn answer a clean 500.
    """
    if directives.cut_after is None:
        await _send_json(send, 200, body)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [_JSON_HEADER, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    raise SimulatedConnectionCut


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_HEADER, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the usual single-message body: no copying
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _HideSimulatedCuts(logging.Filter):
    """Drop uvicorn's "Exception in ASGI application" record for deliberate cuts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedConnectionCut))


def _hide_simulated_cuts_in_uvicorn_log() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _HideSimulatedCuts) for existing in logger.filters):
        logger.addFilter(_HideSimulatedCuts())


def create_app(*, tokens_per_second: float | None = None) -> UpstreamSimulator:
    """Build the simulator ASGI app; ``tokens_per_second`` paces stream token chunks."""
    _hide_simulated_cuts_in_uvicorn_log()
    return UpstreamSimulator(tokens_per_second=tokens_per_second)
