"""An upstream whose streams fail before any content, with the stream's own error event: as
Anthropic does when overloaded (``message_start``, a ``ping``, then an ``overloaded_error``
event) on ``/v1/messages``, and as an OpenAI server whose first event is its error on
``/v1/chat/completions``. ``GET /stats`` counts the chat requests:
`python -m tests.attack.overloaded_upstream PORT`."""

from __future__ import annotations

import asyncio
import sys

import orjson
from aiohttp import web

REQUESTS = {"count": 0}


def sse(kind: str, data: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _stream(request: web.Request, events: bytes) -> web.StreamResponse:
    await request.read()
    REQUESTS["count"] += 1
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(events)
    await response.write_eof()
    return response


async def _pings_forever(request: web.Request, start: dict[str, object]) -> web.StreamResponse:
    REQUESTS["count"] += 1
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "The answer is"}}  # fmt: skip
    await response.write(sse("message_start", start) + sse("content_block_delta", delta))
    while True:  # until the client leaves (a write then fails)
        await asyncio.sleep(0.2)
        await response.write(sse("ping", {"type": "ping"}))


async def messages(request: web.Request) -> web.StreamResponse:
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude",
        "stop_reason": None, "usage": {"input_tokens": 9, "output_tokens": 1}}}  # fmt: skip
    if b"pings forever" in await request.read():
        return await _pings_forever(request, start)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return await _stream(request, sse("message_start", start) + sse("ping", {"type": "ping"})
                         + sse("error", error))  # fmt: skip


async def chat(request: web.Request) -> web.StreamResponse:
    error = {"error": {"message": "The engine is overloaded.", "type": "server_error"}}
    return await _stream(request, b"data: " + orjson.dumps(error) + b"\n\n")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(REQUESTS)


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
