"""An upstream's own error event in a stream is relayed verbatim (gateway/relay.py keeps it as
is), so the secrets Dubhe redacts from non-streaming errors (an upstream key prefix, internal
host names, URLs, IP addresses) reach the client. Fails on fb91792 (main)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest

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


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("leaky")
    port = free_port()
    upstream = start_process([sys.executable, "-m", "tests.attack.leaky_upstream", str(port)],
                             tmp / "upstream.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", upstream.process, upstream.log)
        config = f"""
[[upstreams]]
name = "leaky"
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


def test_an_upstream_error_event_is_redacted(leaky: Server) -> None:
    key = leaky.new_key("pro")
    response = httpx.post(f"{leaky.base_url}/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "dubhe-fast", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert '"error"' in response.text  # the stream does end with an error event
    for secret in (SECRET_KEY_PREFIX, SECRET_HOST, SECRET_IP):
        assert secret not in response.text, response.text
