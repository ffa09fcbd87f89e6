"""A browser (Playwright driving Debian's Chromium) opens the WebSocket chat the way the API
documentation shows: the key as a subprotocol beside ``dubhe.chat.v1``, from a page of the
server's own origin; a page of another origin is refused."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.ws.conftest import WsBilling

CHROMIUM = Path("/usr/bin/chromium")

# Runs in the page: one request over the socket; resolves with what arrived and how it closed.
CHAT = """async ([url, key]) => {
  const socket = new WebSocket(url, ['dubhe.chat.v1', key]);
  const events = [];
  return await new Promise((resolve) => {
    const finish = (extra) => resolve({events, protocol: socket.protocol, ...extra});
    socket.onopen = () => socket.send(JSON.stringify({
      type: 'chat.completion.create', request_id: 'browser-1', model: 'dubhe-fast',
      messages: [{role: 'user', content: 'hello from a browser [[sim:tokens=5]]'}]}));
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      events.push(event);
      if (event.type === 'chat.completion.done' || event.type === 'error') {
        socket.close(1000);
        finish({closed: false});
      }
    };
    socket.onclose = (close) => finish({closed: true, code: close.code});
    setTimeout(() => finish({timeout: true}), 20000);
  });
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def other_origin() -> Iterator[str]:
    """A page on another origin (a plain HTTP server on another port)."""

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = b"<!doctype html><title>elsewhere</title><p>elsewhere"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("ws_database", ["sqlite"], indirect=True)
def test_a_browser_chats_with_the_subprotocol_key(
    ws: WsBilling, browser: Any, other_origin: str
) -> None:
    key = ws.server.new_key("roomy")
    root = ws.server.base_url.removesuffix("/v1")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(root + "/#websocket")  # the API documentation, on the server's own origin
        assert page.locator("#websocket").is_visible()
        result = page.evaluate(CHAT, [ws.ws_url, key])
        assert not result.get("timeout"), result
        assert result["protocol"] == "dubhe.chat.v1"
        kinds = [event["type"] for event in result["events"]]
        assert kinds[-1] == "chat.completion.done", result
        assert kinds.count("chat.completion.chunk") >= 6  # the role chunk, 5 tokens, the stop
        assert all(event["request_id"] == "browser-1" for event in result["events"])
        assert result["events"][-1]["usage"]["completion_tokens"] == 5

        page.goto(other_origin)
        refused = page.evaluate(CHAT, [ws.ws_url, key])
        assert refused.get("closed") and refused["code"] == 1006 and not refused["events"]
    finally:
        context.close()
