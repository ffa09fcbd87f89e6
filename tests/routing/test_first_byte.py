"""Before the first event, nothing is sent: a deployment slow to start is replaced within its
first-byte timeout; a stream whose first event comes after the first keep-alive is due starts
with the keep-alive (and is then no longer retried)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import Server, Sim, fresh_database, start_server
from tests.routing.conftest import assert_no_tracebacks
from tests.upstreams.realistic import iter_events
from tests.upstreams.switchable import Switchable, start_switchable


@pytest.fixture(scope="module")
def setup(
    sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Switchable, Switchable]]:
    tmp = tmp_path_factory.mktemp("first-byte")
    slow, late = start_switchable(tmp / "slow.log"), start_switchable(tmp / "late.log")
    slow.switch(delay_ms=4000)
    late.switch(delay_ms=2500)
    config = f"""
[defaults]
stream_keepalive_seconds = 1

[[upstreams]]
name = "slow"
base_url = "{slow.base_url}"
models = ["dubhe-fast"]
first_byte_timeout_seconds = 0.5

[[upstreams]]
name = "steady"
base_url = "{sims["fast"].base_url}"
models = ["dubhe-fast"]
priority = 1

[[upstreams]]
name = "late"
base_url = "{late.base_url}"
models = ["dubhe-code"]
first_byte_timeout_seconds = 30
"""
    with fresh_database("sqlite", tmp) as url:
        server = start_server(tmp, url, config)
        try:
            yield server, slow, late
        finally:
            server.running.stop()
            slow.stop()
            late.stop()
        assert_no_tracebacks(server.running.log.read_text())


def stream(server: Server, model: str) -> httpx.Response:
    body = {"model": model, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {server.key('ultimate')}"})  # fmt: skip


def test_a_deployment_slow_to_start_is_replaced(
    setup: tuple[Server, Switchable, Switchable], sims: dict[str, Sim]
) -> None:
    server, _, _ = setup
    before = sims["fast"].stats()["requests"]
    response = stream(server, "dubhe-fast")
    assert response.status_code == 200
    events = list(iter_events(response.content))
    assert events[-1] == b"[DONE]"
    assert not response.content.startswith(b": ping")
    # Tried first ("steady" is a lower priority tier), given up after its 0.5 s first-byte timeout, and replaced.
    request_id = response.headers["x-request-id"]
    assert f"upstream slow sent nothing within its first-byte timeout (0.5 s) for {request_id}" in (
        server.running.log.read_text()
    )
    assert sims["fast"].stats()["requests"] == before + 1


def test_a_late_first_event_starts_the_stream_with_a_keepalive(
    setup: tuple[Server, Switchable, Switchable],
) -> None:
    server, _, late = setup
    response = stream(server, "dubhe-code")
    assert response.status_code == 200
    assert response.content.startswith(b": ping\n\n")
    events = list(iter_events(response.content))
    assert events[-1] == b"[DONE]"
    assert "".join(orjson.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if orjson.loads(e)["choices"])  # fmt: skip
    assert late.stats()["requests"] == 1
