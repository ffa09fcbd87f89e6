"""An upstream whose stream ends with its own error event naming its secrets (as a misconfigured
proxy in front of a model server does): `python -m tests.attack.leaky_upstream PORT`."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from tests.upstreams.realistic import SECRET_MESSAGE

CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"dubhe-fast",'
         b'"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}\n\n')


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(CHUNK)
    error = orjson.dumps({"error": {"message": SECRET_MESSAGE, "type": "server_error"}})
    await response.write(b"data: " + error + b"\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
