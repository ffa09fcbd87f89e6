"""Failover with real processes: ``dubhe serve`` in front of ``dubhe upstream-sim`` and the
switchable realistic upstream (tests/upstreams/switchable.py), one deployment failing at a time.

Each model of the gateway's config is one scenario:

- dubhe-fast: "flaky" (answers 500, weighted to be chosen first) and "steady" (a simulator);
- dubhe-vision: "busy" (answers 429 with retry-after: 30, weighted first) and a simulator;
- dubhe-code: "revivable" (a port nothing listens on, until the test starts a server there) in
  the best priority tier, "backup" (a simulator) in the next;
- dubhe-reasoning: "staller" (sends three tokens, then nothing; idle timeout one second);
- dubhe-qwen: two ports nothing listens on;
- dubhe-agent: "text-only" (vision and tools off, the realistic upstream) and a simulator.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from openai import OpenAI
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.database import create_engine
from tests.conftest import Server, Sim, free_port, start_server, wait_for_row
from tests.routing.conftest import assert_no_tracebacks
from tests.upstreams.realistic import Realistic, iter_events
from tests.upstreams.switchable import Switchable, start_switchable
from tests.web.conftest import PASSWORD, WebClient

COOLDOWN = 6.0


class Scenario:
    def __init__(self, server: Server, flaky: Switchable, staller: Switchable, busy: Switchable,
                 revivable_port: int, tmp: Path) -> None:  # fmt: skip
        self.server = server
        self.flaky = flaky
        self.staller = staller
        self.busy = busy
        self.revivable_port = revivable_port
        self.tmp = tmp
        self.started: list[Switchable] = []

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.server.base_url, api_key=self.server.key("ultimate"),
                      max_retries=0, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def scenario(
    database_url: str, sims: dict[str, Sim], realistic: Realistic,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scenario]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("failover")
    flaky = start_switchable(tmp / "flaky.log")
    staller = start_switchable(tmp / "staller.log")
    busy = start_switchable(tmp / "busy.log")
    flaky.switch(status=500)
    staller.switch(stall_after=3)
    busy.switch(status=429, retry_after=30)
    revivable_port = free_port()
    steady = sims["fast"].base_url
    config = f"""
[defaults]
breaker_failures = 3
breaker_cooldown_seconds = {COOLDOWN}
upstream_connect_timeout_seconds = 2

[[upstreams]]
name = "flaky"
base_url = "{flaky.base_url}"
models = ["dubhe-fast"]
weight = 1000

[[upstreams]]
name = "steady"
base_url = "{steady}"
models = ["dubhe-fast"]

[[upstreams]]
name = "busy"
base_url = "{busy.base_url}"
models = ["dubhe-vision"]
weight = 1000

[[upstreams]]
name = "steady-too"
base_url = "{steady}"
models = ["dubhe-vision"]

[[upstreams]]
name = "revivable"
base_url = "http://127.0.0.1:{revivable_port}/v1"
models = ["dubhe-code"]
connect_timeout_seconds = 1

[[upstreams]]
name = "backup"
base_url = "{steady}"
models = ["dubhe-code"]
priority = 1

[[upstreams]]
name = "staller"
base_url = "{staller.base_url}"
models = ["dubhe-reasoning"]
idle_timeout_seconds = 1

[[upstreams]]
name = "dead-1"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["dubhe-qwen"]

[[upstreams]]
name = "dead-2"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["dubhe-qwen"]

[[upstreams]]
name = "text-only"
base_url = "{realistic.base_url}"
models = ["dubhe-agent"]
vision = false
function_calling = false
weight = 1000

[[upstreams]]
name = "full"
base_url = "{steady}"
models = ["dubhe-agent"]
"""
    server = start_server(tmp, database_url, config)
    running = Scenario(server, flaky, staller, busy, revivable_port, tmp)
    yield running
    server.running.stop()
    for upstream in (flaky, staller, busy, *running.started):
        upstream.stop()
    log = server.running.log.read_text()
    assert_no_tracebacks(log)


@pytest.fixture(scope="module")
async def db(scenario: Scenario) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(scenario.server.database_url)
    yield engine
    await engine.dispose()


def ask(model: str, text: str = "Hello!") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 20}


def test_a_deployment_that_does_not_know_the_model_is_routed_around(scenario: Scenario) -> None:
    # An upstream's 404 (a wrong model name or base URL in the operator's config) is not the
    # client's fault: another deployment answers, instead of a 400 for the client.
    client = scenario.client()
    scenario.flaky.switch(status=404)
    before = scenario.flaky.stats()["requests"]
    for _ in range(2):  # fewer than breaker_failures: the next test starts with it closed
        answer = client.chat.completions.create(**ask("dubhe-fast"))  # type: ignore[call-overload]
        assert answer.choices[0].message.content
    assert scenario.flaky.stats()["requests"] - before == 2
    scenario.flaky.switch()  # answers again: its one success resets the failures in a row
    client.chat.completions.create(**ask("dubhe-fast"))  # type: ignore[call-overload]
    assert scenario.flaky.stats()["requests"] - before == 3
    scenario.flaky.switch(status=500)


async def test_a_failing_deployment_is_routed_around_and_billed_once(
    scenario: Scenario, db: AsyncEngine
) -> None:
    client = scenario.client()
    other = OpenAI(base_url=scenario.server.base_url, api_key=scenario.server.new_key("ultimate"),
                   max_retries=0, timeout=60)  # fmt: skip
    before = scenario.flaky.stats()["requests"]
    ids = []

    def ask_fast(who: OpenAI) -> None:
        raw = who.chat.completions.with_raw_response.create(**ask("dubhe-fast"))  # type: ignore[call-overload]
        assert raw.http_response.status_code == 200
        assert raw.parse().choices[0].message.content
        ids.append(raw.headers["x-request-id"])

    # One account alone cannot open the breaker (its requests could be what the upstream
    # chokes on): each of them fails over.
    for _ in range(5):
        ask_fast(client)
    alone = scenario.flaky.stats()["requests"] - before
    assert alone >= 4  # weighted 1000 to 1, it is almost always tried first
    # A second account's requests fail there too: it is the deployment. Its breaker opened, so
    # the later requests went straight to the healthy deployment.
    for _ in range(5):
        ask_fast(other)
    assert 1 <= scenario.flaky.stats()["requests"] - before - alone < 5
    for request_id in ids:
        row = await wait_for_row(db, "SELECT * FROM usage_records WHERE request_id = :r",
                                 r=request_id)  # fmt: skip
        assert row is not None
        # One record, for the attempt that answered: the failed ones are never billed.
        assert (row["upstream"], row["outcome"], row["status_code"]) == ("steady", "ok", 200)
        assert row["completion_tokens"] > 0


def test_an_upstream_s_retry_after_pauses_it(scenario: Scenario) -> None:
    client = scenario.client()
    for _ in range(3):
        answer = client.chat.completions.create(**ask("dubhe-vision"))  # type: ignore[call-overload]
        assert answer.choices[0].message.content
    # Weighted to be chosen first, it answered 429 with retry-after: 30 once; its breaker is
    # not open (one failure), but nothing more is sent there for 30 s.
    assert scenario.busy.stats()["requests"] == 1


def test_a_refusing_deployment_opens_its_breaker_and_closes_once_it_is_back(
    scenario: Scenario,
) -> None:
    client = scenario.client()
    for _ in range(3):
        answer = client.chat.completions.create(**ask("dubhe-code"))  # type: ignore[call-overload]
        assert answer.choices[0].message.content
    opened = time.monotonic()
    revived = start_switchable(scenario.tmp / "revived.log", port=scenario.revivable_port)
    scenario.started.append(revived)
    if time.monotonic() - opened < COOLDOWN - 1:
        client.chat.completions.create(**ask("dubhe-code"))  # type: ignore[call-overload]
        assert revived.stats()["requests"] == 0, "the open breaker still sends requests"
    time.sleep(max(0.0, opened + COOLDOWN + 0.5 - time.monotonic()))
    for _ in range(3):
        client.chat.completions.create(**ask("dubhe-code"))  # type: ignore[call-overload]
    # The half-open trial succeeded and closed the breaker: the best tier serves again.
    assert revived.stats()["requests"] == 3


async def test_a_stall_mid_stream_ends_with_the_error_frame_and_bills_what_was_delivered(
    scenario: Scenario, db: AsyncEngine
) -> None:
    body = {**ask("dubhe-reasoning"), "stream": True, "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {scenario.server.key('ultimate')}"}
    with httpx.stream("POST", scenario.server.base_url + "/chat/completions", json=body,
                      headers=headers, timeout=30) as response:  # fmt: skip
        assert response.status_code == 200
        raw = response.read()
        request_id = response.headers["x-request-id"]
    events = list(iter_events(raw))
    assert b"[DONE]" not in events
    error = orjson.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    delivered = "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in orjson.loads(event)["choices"]
    )
    assert len(delivered.split()) == 3
    row = await wait_for_row(db, "SELECT * FROM usage_records WHERE request_id = :r", r=request_id)
    assert row is not None
    assert (row["outcome"], row["completion_tokens"]) == ("stream_interrupted", 3)
    assert row["prompt_tokens"] > 0
    assert scenario.staller.charged(request_id)["completion_tokens"] == 3  # type: ignore[index]


def test_every_deployment_down_gives_502_then_503_with_retry_after(scenario: Scenario) -> None:
    headers = {"authorization": f"Bearer {scenario.server.key('ultimate')}"}
    answers = [
        httpx.post(scenario.server.base_url + "/chat/completions", json=ask("dubhe-qwen"),
                   headers=headers, timeout=30)
        for _ in range(4)
    ]  # fmt: skip
    first, last = answers[0], answers[-1]
    assert first.status_code == 502, first.text
    assert first.json()["error"]["code"] == "upstream_unreachable"
    # Both breakers opened: no connection is even tried now.
    assert last.status_code == 503, last.text
    assert last.json()["error"]["code"] == "no_healthy_upstream"
    assert 1 <= int(last.headers["retry-after"]) <= COOLDOWN + 1


def test_images_go_only_to_deployments_that_take_them(
    scenario: Scenario, realistic: Realistic
) -> None:
    client = scenario.client()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    ids = []
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
            model="dubhe-agent", max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}],
        )  # fmt: skip
        assert raw.http_response.status_code == 200
        ids.append(raw.headers["x-request-id"])
    # The text-only deployment (weighted to be chosen first) never saw one of them...
    assert all(realistic.charged(request_id) is None for request_id in ids)
    # ...but does take a plain text request.
    raw = client.chat.completions.with_raw_response.create(**ask("dubhe-agent"))  # type: ignore[call-overload]
    assert realistic.charged(raw.headers["x-request-id"]) is not None


def test_admins_see_each_deployment_s_breaker(scenario: Scenario) -> None:
    server = scenario.server
    root = server.base_url.removesuffix("/v1")
    for _ in range(3):  # every deployment of dubhe-qwen is down: their breakers open
        httpx.post(server.base_url + "/chat/completions", json=ask("dubhe-qwen"), timeout=30,
                   headers={"authorization": f"Bearer {server.key('ultimate')}"})  # fmt: skip
    # The worker's first request outside /v1 waits for the web app's lazy build (seconds on a
    # busy machine): more than httpx's default 5 s timeout.
    assert httpx.get(root + "/admin/api/upstreams", timeout=30).status_code == 401
    admin_email = f"admin-{secrets.token_hex(3)}@example.com"
    server.cli("users", "create", admin_email, "--password", PASSWORD, "--admin")
    user_email = f"user-{secrets.token_hex(3)}@example.com"
    server.cli("users", "create", user_email, "--password", PASSWORD)
    with WebClient(root, "10.20.30.40") as user:
        assert user.log_in(user_email, PASSWORD).status_code == 200
        refused = user.get("/admin/api/upstreams")
        assert refused.status_code == 403, refused.text
    with WebClient(root, "10.20.30.41") as admin:
        assert admin.log_in(admin_email, PASSWORD).status_code == 200
        response = admin.get("/admin/api/upstreams")
        page = admin.get("/admin/upstreams")
    assert response.status_code == 200, response.text
    # The admin console's own view (GET /admin/api/upstreams), with each breaker in it.
    deployments = {entry["name"]: entry for entry in response.json()}
    assert deployments["dead-1"]["breaker"]["state"] == "open"
    assert deployments["dead-2"]["breaker"]["state"] == "open"
    assert deployments["dead-2"]["breaker"]["consecutive_failures"] >= 3
    assert deployments["steady"]["breaker"]["state"] == "closed"
    assert (deployments["backup"]["priority"], deployments["flaky"]["weight"]) == (1, 1000)
    assert "api_key_env" not in deployments["steady"]
    assert page.status_code == 200
    dead = page.text[page.text.index("dead-1"):]
    assert "Circuit breaker: <strong>open</strong>" in dead[:dead.index("</section>")]
