"""An upstream's error event written ``data:{...}`` (no space after the colon: valid SSE) is not
recognised by the relay (``relay._ERROR_EVENT`` is ``data: {"error"``, with the space), so it is
neither redacted nor ends the stream; the WebSocket framing (``ws._frames``) strips the space
and does recognise it, so the client gets an ``error`` event carrying the upstream's secrets
(its key prefix, internal host and IP address) in the middle of a request that then goes on
streaming and ends with a ``chat.completion.done``: two terminal events for one request, against
decisions.md §7. ``dubhe.client.ws`` stops that request at the error (raises
``ChatSocketError``) while the server keeps relaying and billing it. The same upstream's
``data:[DONE]`` is not recognised either, so an honest stream of such a server always ends in a
502 ``upstream_error`` (a second terminal event here). Over HTTP the secrets leak the same way
(the relay is shared). Fix: the relay matches
``data:`` with or without the space (``_ERROR_EVENT``, ``_DONE_EVENT``) or normalises it.
Fails on 910dad1 (branch ws)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from tests.conftest import (
    ROOT,
    Server,
    assert_clean_log,
    free_port,
    start_process,
    start_server,
    wait_until_up,
)
from tests.upstreams.realistic import SECRET_HOST, SECRET_IP, SECRET_KEY_PREFIX
from tests.ws.conftest import bearer, create, next_event


@pytest.fixture(scope="module")
def nospace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("nospace")
    port = free_port()
    upstream = start_process([sys.executable, "-m", "tests.attack.nospace_upstream", str(port)],
                             tmp / "upstream.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", upstream.process, upstream.log)
        config = f"""
[[upstreams]]
name = "nospace"
kind = "openai"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast"]
"""
        server = start_server(tmp, f"sqlite+aiosqlite:///{tmp / 'dubhe.db'}", config,
                              PYTHONPATH=str(ROOT))
        yield server
        server.running.stop()
        assert_clean_log(server)
    finally:
        upstream.stop()


async def test_an_unspaced_upstream_error_event_is_redacted_and_ends_the_request(
    nospace: Server,
) -> None:
    key = nospace.new_key("pro")
    url = nospace.base_url.replace("http://", "ws://") + "/ws/chat"
    received: list[str] = []
    async with connect(url, additional_headers=bearer(key)) as socket:
        await socket.send(create("r", "dubhe-fast", "hi"))
        while True:
            try:
                event = await next_event(socket, timeout=10)
            except TimeoutError:
                break  # nothing more for this request
            received.append(json.dumps(event))
            if event["type"] == "chat.completion.done":
                break
    text = "\n".join(received)
    for secret in (SECRET_KEY_PREFIX, SECRET_HOST, SECRET_IP):
        assert secret not in text, text
    terminal = [line for line in received
                if json.loads(line)["type"] in ("error", "chat.completion.done")]
    assert len(terminal) == 1, terminal
