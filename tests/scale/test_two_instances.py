"""Plan limits held across two instances (one with two workers) through one Redis, with the
official SDK as the client: requests, tokens and concurrency; Redis stopped mid-test."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dubhe.keys.format import display_prefix
from tests.conftest import ROOT, Server, Sim, free_port
from tests.scale.conftest import Cluster

_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(s|ms)$")


def _sdk(server: Server, key: str, **options: Any) -> openai.AsyncOpenAI:
    """An SDK client that reports every answer as it is (no retries). Left open, the suite
    closes it after the test (tests/conftest.py: ``pytest_runtest_call``)."""
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, max_retries=0, **options)


def _clients(cluster: Cluster, key: str) -> list[openai.AsyncOpenAI]:
    return [_sdk(server, key, timeout=60) for server in (cluster.a, cluster.b)]


def _assert_limit_headers(headers: httpx.Headers) -> None:
    for kind in ("requests", "tokens"):
        assert int(headers[f"x-ratelimit-limit-{kind}"]) > 0
        assert int(headers[f"x-ratelimit-remaining-{kind}"]) >= 0
        assert _DURATION.match(headers[f"x-ratelimit-reset-{kind}"]), headers


async def test_requests_per_minute_hold_across_instances(cluster: Cluster) -> None:
    key = cluster.key(rpm=30)
    clients = _clients(cluster, key)
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> tuple[str, httpx.Headers] | openai.RateLimitError:
        async with gate:
            try:
                raw = await clients[i % 2].chat.completions.with_raw_response.create(
                    model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as error:
                return error
            return ("served", raw.headers)

    results = await asyncio.gather(*(one(i) for i in range(100)))
    served = [r[1] for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(served) + len(refused) == 100
    # 30 at once (a minute's burst), plus one every 2 s while the 100 are sent.
    assert 30 <= len(served) <= 35, len(served)
    for headers in served:
        _assert_limit_headers(headers)
        assert headers["x-ratelimit-limit-requests"] == "30"
    assert min(int(h["x-ratelimit-remaining-requests"]) for h in served) <= 1
    # An answer that counts nothing carries the headers too.
    listed = await clients[1].models.with_raw_response.list()
    _assert_limit_headers(listed.headers)
    assert listed.headers["x-ratelimit-limit-requests"] == "30"
    for error in refused:
        assert error.status_code == 429
        body = error.body
        assert isinstance(body, dict)
        assert body["code"] == "rate_limit_exceeded" and body["type"] == "rate_limit_error"
        assert "requests per minute" in body["message"]
        headers = error.response.headers
        assert int(headers["retry-after"]) >= 1
        assert int(headers["retry-after-ms"]) >= 1
        _assert_limit_headers(headers)
        assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_per_minute_count_real_usage(cluster: Cluster) -> None:
    # Each request holds ~1,000 output tokens up front and uses ~30: without the correction the
    # third would be refused.
    key = cluster.key(tpm=3000)
    clients = _clients(cluster, key)
    for i in range(10):
        raw = await clients[i % 2].chat.completions.with_raw_response.create(
            model="dubhe-fast", max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
        _assert_limit_headers(raw.headers)
        assert raw.headers["x-ratelimit-limit-tokens"] == "3000"
    # One request that can never fit in a minute's tokens is refused, naming the limit.
    with pytest.raises(openai.RateLimitError) as refused:
        await clients[0].chat.completions.create(
            model="dubhe-fast", max_tokens=4000, messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert isinstance(body, dict) and "tokens per minute" in body["message"]
    # A burst of large holds is cut at the limit, not at a worker's share of it.
    results = await asyncio.gather(*(
        clients[i % 2].chat.completions.create(
            model="dubhe-fast", max_tokens=900,
            messages=[{"role": "user", "content": "[[sim:delay_ms=300]] hi"}])
        for i in range(8)), return_exceptions=True)
    served = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, openai.RateLimitError) for r in results if r not in served)
    assert 1 <= len(served) <= 3, results


async def test_concurrency_holds_under_50_parallel_streams(
    cluster: Cluster, sims: dict[str, Sim]
) -> None:
    key = cluster.key(concurrency=5)
    clients = _clients(cluster, key)

    async def stream(i: int) -> int | openai.RateLimitError:
        try:
            chunks = await clients[i % 2].chat.completions.create(
                model="dubhe-fast", stream=True,
                messages=[{"role": "user", "content": "[[sim:delay_ms=10000]] hi"}])
        except openai.RateLimitError as error:
            return error
        return len([chunk async for chunk in chunks])

    sim = sims["fast"]
    received = sim.stats()["requests"]
    most_active = 0
    sending = asyncio.ensure_future(asyncio.gather(*(stream(i) for i in range(50))))
    while not sending.done():
        # The upstream's own count of requests in flight: what the limit must hold.
        active = (await asyncio.to_thread(sim.stats))["active"]
        most_active = max(most_active, active)
        await asyncio.sleep(0.1)
    results = sending.result()
    served = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    received = sim.stats()["requests"] - received
    assert most_active <= 5, (most_active, len(served), received)
    assert len(served) >= 5 and len(refused) >= 30, (len(served), len(refused))
    assert len(served) + len(refused) == 50
    for error in refused:
        body = error.body
        assert isinstance(body, dict) and "concurrent requests" in body["message"]
    # The slots came back: the key can be used again at once.
    again = await clients[1].chat.completions.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content


def _served(server_root: str) -> float:
    text = httpx.get(f"{server_root}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "dubhe_http_requests_total"
                    and sample.labels == {"path": "/v1/chat/completions", "status": "200"}):
                total += sample.value
    return total


async def _settled_count(server_root: str) -> float:
    """``_served`` once the earlier tests' answers are all counted: a worker syncs its counts
    for the other's scrapes once a second, so a count unchanged over 1.5 s is complete."""
    last = _served(server_root)
    while True:
        await asyncio.sleep(1.5)
        now = _served(server_root)
        if now == last:
            return now
        last = now


async def test_metrics_count_every_workers_requests(cluster: Cluster) -> None:
    root = cluster.a.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/readyz").json() == {
        "status": "ready", "checks": {"database": "ok", "migrations": "ok", "redis": "ok"}}
    before = await _settled_count(root)
    key = cluster.key()
    client = _sdk(cluster.a, key)
    # Two workers behind one port: the kernel spreads the connections over both.
    for _ in range(12):
        await client.chat.completions.create(
            model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        client = _sdk(cluster.a, key)
    # The count, like the log line, follows the answer; once there, every scrape shows it.
    deadline = time.monotonic() + 10
    while _served(root) - before < 12 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # Whichever worker answers the scrape, it reports all of them.
    for _ in range(4):
        assert _served(root) - before == 12
    # One JSON line per request, from both workers: who, what, how much; never the key or the
    # prompt.
    await client.chat.completions.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "a private prompt 7f3a"}])
    # A worker writes the line once the answer is sent, so the last one may trail the answer.
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in cluster.a.running.log.read_text().splitlines()
                 if line.startswith("{")]
        # Prefixes collide across keys only by chance; the log carries the key id as well.
        mine = [line for line in lines if line.get("key_prefix") == display_prefix(key)
                and line["path"] == "/v1/chat/completions"]
        if len(mine) >= 13 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(mine) == 13, lines[-3:]
    for line in mine:
        assert line["status"] == 200 and line["model"] == "dubhe-fast"
        assert line["upstream"] == "fast" and line["prompt_tokens"] > 0
        assert line["cost_uusd"] >= 0 and line["latency_ms"] > 0
    text = cluster.a.running.log.read_text()
    assert key not in text and "7f3a" not in text


@contextmanager
def _nginx(cluster: Cluster, tmp: Path) -> Iterator[str]:
    """Debian's nginx with deploy/nginx.conf, its upstreams pointed at the two instances."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    for name, server in (("dubhe-1", cluster.a), ("dubhe-2", cluster.b)):
        config = config.replace(f"{name}:8000", server.base_url.removeprefix("http://")
                                .removesuffix("/v1"))
    config = (config.replace("listen 80;", f"listen 127.0.0.1:{port};")
              .replace("/tmp/nginx", f"{tmp}/nginx"))
    if os.geteuid() == 0:
        config = "user root;\n" + config  # workers must reach the test's private directory
    (tmp / "nginx.conf").write_text(config)
    process = subprocess.Popen([binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                                "-e", str(tmp / "error.log"), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "error.log").read_text()) from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_nginx_relays_streams_unbuffered_and_enforces_its_limits(
    cluster: Cluster, tmp_path: Path
) -> None:
    key = cluster.key()
    with _nginx(cluster, tmp_path) as root:
        async with httpx.AsyncClient(timeout=60) as client:
            # The paced upstream makes 40 tokens a second: 60 tokens take 1.5 s to generate.
            arrivals: list[float] = []
            async with client.stream(
                "POST", f"{root}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": "dubhe-code", "stream": True,
                      "messages": [{"role": "user", "content": "[[sim:tokens=60]] hi"}]},
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-ratelimit-limit-requests"] == "100000"
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        arrivals.append(time.monotonic())
            assert len(arrivals) > 60
            # Relayed as generated: the first event arrived long before the last was made
            # (a buffering proxy delivers them all at the end, together).
            assert arrivals[-1] - arrivals[0] > 0.75, arrivals[-1] - arrivals[0]
            # Both instances answer behind it.
            for _ in range(4):
                done = await client.post(
                    f"{root}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                    json={"model": "dubhe-fast",
                          "messages": [{"role": "user", "content": "hi"}]})
                assert done.status_code == 200
            # What only a proxy can enforce: oversized headers and bodies never reach Dubhe.
            too_long = await client.get(f"{root}/healthz", headers={"x-pad": "a" * 40_000})
            assert too_long.status_code == 400
            too_big = await client.post(f"{root}/v1/chat/completions",
                                        content=b"x" * (3 * 1024 * 1024),
                                        headers={"authorization": f"Bearer {key}"})
            assert too_big.status_code == 413
            # /metrics is for the internal network; loopback is allowed.
            assert (await client.get(f"{root}/metrics")).status_code == 200


async def test_a_key_revoked_through_one_instance_is_refused_by_the_other_at_once(
    cluster: Cluster,
) -> None:
    key = cluster.key()
    other = _sdk(cluster.b, key)
    await other.chat.completions.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])  # cached on b now
    cluster.a.cli("keys", "revoke", key)
    revoked_at = time.monotonic()
    while True:
        try:
            await other.chat.completions.create(
                model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            break
        # Pushed (PostgreSQL NOTIFY), not waited for by the one-second poll.
        assert time.monotonic() - revoked_at < 1.0
        await asyncio.sleep(0.02)


async def test_redis_down_follows_each_instances_policy(cluster: Cluster) -> None:
    key = cluster.key(rpm=1000)
    open_client, closed_client = _clients(cluster, key)
    await open_client.chat.completions.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
    cluster.redis.stop()
    # Past the lease: the next request must ask Redis (a slice in hand is spent without it).
    await asyncio.sleep(1.5)
    # Fail open: served on the worker's own limits, never a 500.
    for _ in range(6):
        done = await open_client.chat.completions.create(
            model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content
    # Fail closed: 503 rate_limiter_unavailable with retry-after, never a 500.
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as refused:
            await closed_client.chat.completions.create(
                model="dubhe-fast", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 503
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "rate_limiter_unavailable"
        assert refused.value.response.headers["retry-after"] == "1"
    root = cluster.b.base_url.removesuffix("/v1")
    ready = httpx.get(f"{root}/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "unreachable"
    for server in (cluster.a, cluster.b):
        log = server.running.log.read_text()
        assert "Traceback" not in log, log
        assert "Redis is unreachable" in log
