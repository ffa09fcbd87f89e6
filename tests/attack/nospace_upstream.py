"""An upstream that writes its SSE fields without the optional space after ``data:`` (valid
SSE, and what several servers send) and puts its own error event mid-stream, naming its secrets,
then goes on: `python -m tests.attack.nospace_upstream PORT`."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from tests.upstreams.realistic import SECRET_MESSAGE


def chunk(content: str) -> bytes:
    return b"data:" + orjson.dumps({
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "dubhe-fast",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }) + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chunk(" the"))
    error = orjson.dumps({"error": {"message": SECRET_MESSAGE, "type": "server_error"}})
    await response.write(b"data:" + error + b"\n\n")
    for _ in range(20):
        await response.write(chunk(" of"))
    await response.write(b"data:[DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
