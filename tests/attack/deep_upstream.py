"""An upstream whose non-streaming 200 carries, beside a valid answer, a field nested deeper than
a JSON encoder re-encodes (a stream: in its usage chunk) (orjson parses 1024 levels but writes at most 254), as an OpenAI
server (``/v1/chat/completions``) and as Anthropic (``/v1/messages``):
A prompt containing "error body" gets instead a 200 whose body is an error envelope naming the
upstream's secrets (``/v1/chat/completions``): `python -m tests.attack.deep_upstream PORT`."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

from tests.upstreams.realistic import SECRET_MESSAGE

DEPTH = 400
DEEP = b"[" * DEPTH + b"]" * DEPTH


CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"Paris is the capital."},'
         b'"finish_reason":null}]}\n\n')
# The usage chunk, with the deep field beside the counts.
USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10,'
         b'"extra":' + DEEP + b"}}\n\n")


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    if b"error body" in raw:
        error = {"error": {"message": SECRET_MESSAGE, "type": "server_error"}}
        return web.Response(body=orjson.dumps(error), content_type="application/json")
    if body.get("stream"):
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(CHUNK)
        await response.write(USAGE + b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    answer = orjson.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "extra": None,
    })  # fmt: skip
    return web.Response(body=answer.replace(b"null", DEEP), content_type="application/json")


async def messages(request: web.Request) -> web.Response:
    await request.read()
    answer = orjson.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Paris."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": None}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 2},
    })  # fmt: skip
    return web.Response(body=answer.replace(b"null", DEEP), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
