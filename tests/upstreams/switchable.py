"""The realistic upstream with a switch a test flips at run time, to fail one deployment of
several without touching the request (directives in the prompt reach every deployment alike).

``POST /up/mode`` with a JSON object sets how every following chat request is answered:
``{"status": 500}`` an error envelope with that status (``"retry_after": N`` adds the header);
``{"stall_after": K}`` a stream that sends K tokens and then nothing more, never ending, until
the client leaves; ``{"delay_ms": N}`` the normal answer, N ms late (nothing is sent before); ``{}`` back to the realistic upstream's normal answers. The ledger
(``/up/stats``) counts every chat request, failed ones included.

Run it with ``python -m tests.upstreams.switchable --port N``; ``start_switchable()`` does that.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

from dubhe.sim._disconnect import DisconnectWatcher, Receive
from dubhe.sim._errors import error_body
from tests.upstreams.realistic import (
    ROOT,
    Charge,
    Plan,
    Realistic,
    RealisticUpstream,
    Send,
    _check_words,
    _send_json,
)


class SwitchableUpstream(RealisticUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.mode: dict[str, Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/up/mode" and scope["method"] == "POST":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            self.mode = orjson.loads(body or b"{}")
            await _send_json(send, 200, b"{}")
            return
        status = self.mode.get("status")
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and status:
            self.ledger.requests += 1
            while (await receive()).get("more_body"):
                pass
            headers = [(b"content-type", b"application/json")]
            if self.mode.get("retry_after"):
                headers.append((b"retry-after", str(self.mode["retry_after"]).encode()))
            body = error_body("The deployment is failing (switched on by the test).",
                              "server_error")  # fmt: skip
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        delay = self.mode.get("delay_ms")
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions" and delay:
            await asyncio.sleep(delay / 1000)  # before the status line: a slow first byte
        await super().__call__(scope, receive, send)

    async def _generate(
        self, watcher: DisconnectWatcher, plan: Plan, charge: Charge, count: int
    ) -> bool:
        stall_after = self.mode.get("stall_after")
        if stall_after is not None and charge.completion_tokens + count > stall_after:
            await watcher.wait(3600)  # stalled: nothing more until the client leaves
            return False
        return await super()._generate(watcher, plan, charge, count)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from dubhe.sim._server import _bind

    parser = argparse.ArgumentParser(description="The switchable test upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    _check_words()
    app = SwitchableUpstream()
    listener = _bind(args.host, args.port)
    app.port = listener.getsockname()[1]
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on",
                            access_log=False, log_level="warning", server_header=False)
    uvicorn.Server(config).run(sockets=[listener])


class Switchable(Realistic):
    def switch(self, **mode: Any) -> None:
        httpx.post(f"{self.root}/up/mode", json=mode, timeout=10).raise_for_status()


def start_switchable(log: Path, port: int | None = None) -> Switchable:
    from tests.conftest import free_port, wait_until_up

    port = port or free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.upstreams.switchable", "--port", str(port)],
        cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_until_up(f"http://127.0.0.1:{port}/up/stats", process, log)
    return Switchable(f"http://127.0.0.1:{port}/v1", process, log)


if __name__ == "__main__":
    main()
