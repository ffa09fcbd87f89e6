"""An upstream that honours the output limit it is sent but reports as many completion tokens as
the bytes of its answer allow (plus the 16 per choice Dubhe tolerates): every word it generates is
one long word. `python -m tests.attack.padding_upstream PORT`; `GET /stats` gives what it
generated and what it reported."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web

WORD = " internationalization"  # 21 bytes
STATS = {"requests": 0, "generated": 0, "reported": 0}


async def chat(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    content = WORD * int(limit)
    reported = len(content.encode()) + 16
    STATS["requests"] += 1
    STATS["generated"] += int(limit)
    STATS["reported"] += reported
    answer = {
        "id": "chatcmpl-pad", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": reported,
                  "total_tokens": 10 + reported},
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(STATS)


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
