"""The physical limit: the least a Python proxy on Dubhe's stack can do, to measure Dubhe against.

    .venv/bin/python bench/bare_proxy.py --port P --upstream fast=http://127.0.0.1:S/v1 [...]

Raw ASGI on the same server stack as `dubhe serve` (uvicorn, uvloop, stock httptools protocol,
the same keep-alive and backlog), one aiohttp session (the baseline the billing-holes issue
defines; configured as the gateway's upstream session was before it got its own client), and
nothing else: no auth, no validation, no billing, no request id, no parsing of
anything. It reads the request body, POSTs it unchanged to the upstream picked by the first
path segment (`POST /fast/v1/chat/completions` goes to the `fast` upstream's
`/chat/completions`), and relays the answer: non-streaming in one send with a content-length,
streams byte for byte as the upstream's reads arrive. bench/run.py measures it exactly like the gateway, so "gateway / bare"
is what Dubhe's features cost on top of relaying, whatever the machine.

It imports nothing from `dubhe` on purpose: its start time and memory are the stack's own.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_UPSTREAM_HEADERS = {"content-type": "application/json"}  # what the gateway sends, minus auth
_EVENT_STREAM = "text/event-stream"


class BareProxy:
    def __init__(self, upstreams: dict[str, str]) -> None:
        # Path -> upstream chat URL, so routing is one dict lookup on the raw path.
        self.routes = {
            f"/{name}/v1/chat/completions": f"{base_url.rstrip('/')}/chat/completions"
            for name, base_url in upstreams.items()
        }
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # The gateway's connector settings: no connection cap, DNS cached, no
                # decompression, no default headers.
                connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30)
                self.session = aiohttp.ClientSession(
                    connector=connector,
                    timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=600),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding"),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        url = self.routes.get(scope["path"])
        if url is None:
            status = 200 if scope["path"] == "/healthz" else 404
            await _send_plain(send, status, b"ok" if status == 200 else b"not found")
            return
        body = await _read_body(receive)
        assert self.session is not None
        try:
            await self._relay(url, body, send)
        except aiohttp.ClientError:
            # Before the answer started this is the client's 502; after, uvicorn refuses a second
            # start and closes the connection, which the benchmark's gates count either way.
            await _send_plain(send, 502, b"upstream unreachable")

    async def _relay(self, url: str, body: bytes, send: Send) -> None:
        assert self.session is not None
        async with self.session.post(url, data=body, headers=_UPSTREAM_HEADERS) as response:
            content_type = response.headers.get("content-type", "application/json")
            if not content_type.startswith(_EVENT_STREAM):
                raw = await response.read()
                await send({
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(raw)).encode())],
                })  # fmt: skip
                await send({"type": "http.response.body", "body": raw})
                return
            await send({
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"cache-control", b"no-cache")],
            })  # fmt: skip
            async for data in response.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_plain(send: Send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _upstream(value: str) -> tuple[str, str]:
    name, sep, base_url = value.partition("=")
    if not sep or not name or not base_url.startswith("http"):
        raise argparse.ArgumentTypeError(f"expected NAME=BASE_URL, got {value!r}")
    return name, base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=_upstream, action="append", required=True,
                        metavar="NAME=BASE_URL", help="e.g. fast=http://127.0.0.1:9000/v1")  # fmt: skip
    args = parser.parse_args()
    # `dubhe serve`'s settings, so the server stack costs the same on both sides; its protocol
    # subclass (connection limits) and security headers are Dubhe's features, so not here.
    uvicorn.run(
        BareProxy(dict(args.upstream)),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="info",
        timeout_keep_alive=30,  # the default of Dubhe's keepalive_timeout_seconds
        backlog=4096,
    )


if __name__ == "__main__":
    main()
