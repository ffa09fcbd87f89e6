"""The WebSocket chat (``/v1/ws/chat``) routes through the same ``ChatCompletion`` as HTTP, so it
fails over the same way: a deployment answering 500 or sending nothing within its first-byte
timeout is replaced before the client sees a frame; a stall after the first frames ends the
request with an error frame, billed for what was delivered; nothing up gives the error frame.

One ``dubhe serve`` on PostgreSQL:

- dubhe-fast: "flaky" (answers 500, tried first: "steady" is a lower priority tier; its breaker
  needs 100 failures to open, so every request meets it) and "steady" (a simulator);
- dubhe-code: "slow" (answers 4 s late, first-byte timeout 0.5 s, tried first) and a simulator;
- dubhe-reasoning: "staller" (three tokens, then nothing; idle timeout one second);
- dubhe-qwen: a port nothing listens on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import connect

from dubhe.database import create_engine
from tests.conftest import Server, Sim, free_port, fresh_database, start_server, wait_for_row
from tests.routing.conftest import assert_no_tracebacks
from tests.upstreams.switchable import Switchable, start_switchable
from tests.ws.conftest import bearer, create, until_done


class Setup:
    def __init__(self, server: Server, flaky: Switchable, slow: Switchable,
                 staller: Switchable) -> None:  # fmt: skip
        self.server = server
        self.flaky = flaky
        self.slow = slow
        self.staller = staller

    @property
    def ws_url(self) -> str:
        return self.server.base_url.replace("http://", "ws://") + "/ws/chat"


@pytest.fixture(scope="module")
def setup(sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("ws-failover")
    flaky, slow = start_switchable(tmp / "flaky.log"), start_switchable(tmp / "slow.log")
    staller = start_switchable(tmp / "staller.log")
    flaky.switch(status=500)
    slow.switch(delay_ms=4000)
    staller.switch(stall_after=3)
    steady = sims["fast"].base_url
    config = f"""
[defaults]
breaker_failures = 100

[[upstreams]]
name = "flaky"
base_url = "{flaky.base_url}"
models = ["dubhe-fast"]

[[upstreams]]
name = "steady"
base_url = "{steady}"
models = ["dubhe-fast"]
priority = 1

[[upstreams]]
name = "slow"
base_url = "{slow.base_url}"
models = ["dubhe-code"]
first_byte_timeout_seconds = 0.5

[[upstreams]]
name = "steady-code"
base_url = "{steady}"
models = ["dubhe-code"]
priority = 1

[[upstreams]]
name = "staller"
base_url = "{staller.base_url}"
models = ["dubhe-reasoning"]
idle_timeout_seconds = 1

[[upstreams]]
name = "dead"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["dubhe-qwen"]
"""
    with fresh_database("postgresql", tmp) as url:
        server = start_server(tmp, url, config)
        try:
            yield Setup(server, flaky, slow, staller)
        finally:
            server.running.stop()
            for upstream in (flaky, slow, staller):
                upstream.stop()
        assert_no_tracebacks(server.running.log.read_text())


@pytest.fixture(scope="module")
async def db(setup: Setup) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(setup.server.database_url)
    yield engine
    await engine.dispose()


async def record(db: AsyncEngine, request_id: object) -> dict[str, object]:
    row = await wait_for_row(db, "SELECT * FROM usage_records WHERE request_id = :r",
                             r=str(request_id))  # fmt: skip
    assert row is not None, f"no usage record for {request_id}"
    return dict(row)


async def test_a_failing_deployment_is_routed_around_on_the_socket(
    setup: Setup, db: AsyncEngine
) -> None:
    before = setup.flaky.stats()["requests"]
    async with connect(setup.ws_url, additional_headers=bearer(setup.server.key("ultimate"))) as socket:
        done = []
        for n in range(3):
            await socket.send(create(f"r{n}", "dubhe-fast", "Hello!", max_tokens=20))
            chunks, end = await until_done(socket, f"r{n}")
            assert end["type"] == "chat.completion.done" and end["status"] == "completed", end
            assert "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in chunks if c["choices"])  # fmt: skip
            done.append(end)
    # Each request met the failing deployment first (its weight) and was answered by the other.
    assert setup.flaky.stats()["requests"] == before + 3
    for end in done:
        row = await record(db, end["server_request_id"])
        # One record, for the attempt that answered: the failed ones are never billed.
        assert (row["upstream"], row["outcome"], row["stream"]) == ("steady", "ok", True)
        assert row["completion_tokens"] == end["usage"]["completion_tokens"] > 0


async def test_a_deployment_slow_to_start_is_replaced_on_the_socket(
    setup: Setup, db: AsyncEngine
) -> None:
    async with connect(setup.ws_url, additional_headers=bearer(setup.server.key("ultimate"))) as socket:
        await socket.send(create("slow", "dubhe-code", "Hello!", max_tokens=8))
        _, end = await until_done(socket, "slow")
    assert end["type"] == "chat.completion.done" and end["status"] == "completed", end
    row = await record(db, end["server_request_id"])
    assert row["upstream"] == "steady-code"
    assert (f"upstream slow sent nothing within its first-byte timeout (0.5 s) for "
            f"{end['server_request_id']}") in setup.server.running.log.read_text()


async def test_a_stall_after_the_first_frames_ends_with_an_error_frame_billed_as_delivered(
    setup: Setup, db: AsyncEngine
) -> None:
    async with connect(setup.ws_url, additional_headers=bearer(setup.server.key("ultimate"))) as socket:
        await socket.send(create("stall", "dubhe-reasoning", "Hello!", max_tokens=20))
        chunks, end = await until_done(socket, "stall")
    assert end["type"] == "error", end
    assert end["error"]["code"] == "upstream_error"
    delivered = "".join(c["choices"][0]["delta"].get("content") or ""
                        for c in chunks if c["choices"])  # fmt: skip
    assert len(delivered.split()) == 3
    row = await record(db, end["server_request_id"])
    assert (row["outcome"], row["completion_tokens"]) == ("stream_interrupted", 3)


async def test_nothing_up_gives_the_error_frame(setup: Setup) -> None:
    async with connect(setup.ws_url, additional_headers=bearer(setup.server.key("ultimate"))) as socket:
        await socket.send(create("down", "dubhe-qwen", "Hello!", max_tokens=8))
        _, end = await until_done(socket, "down")
    assert end["type"] == "error", end
    assert end["error"]["code"] in ("upstream_unreachable", "no_healthy_upstream")
