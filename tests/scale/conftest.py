"""Two ``dubhe serve`` instances sharing one PostgreSQL database and one private Redis."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import Server, Sim, free_port, fresh_database, start_server

# Only the test's own limits apply: the plan's are far above anything the tests send.
SCALE_CONFIG = """
[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{fast}"
models = ["dubhe-fast"]

[[upstreams]]
name = "paced"
kind = "openai"
base_url = "{paced}"
models = ["dubhe-code"]

[plans.roomy]
name = "Roomy"
price_usd = "0"
models = ["dubhe-fast", "dubhe-code"]
included_tokens = 100_000_000
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000
"""


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_redis(tmp: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    client.close()
    return RedisServer(f"redis://127.0.0.1:{port}/0", port, process)


@dataclass
class Cluster:
    a: Server  # fail open when Redis is down
    b: Server  # fail closed
    redis: RedisServer

    def key(self, **limits: int) -> str:
        email = f"scale-{secrets.token_hex(4)}@example.com"
        key = self.a.new_account(email, plan="roomy")
        if limits:
            args = [part for name, value in limits.items() for part in (f"--{name}", str(value))]
            self.a.cli("keys", "limits", key, *args)
        return key


@pytest.fixture(scope="module")
def cluster(sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("scale")
    redis_server = start_redis(tmp)
    config = SCALE_CONFIG.format(fast=sims["fast"].base_url, paced=sims["paced"].base_url)
    prefix = f"t{secrets.token_hex(4)}:"
    try:
        with fresh_database("postgresql", tmp) as url:
            (tmp / "a").mkdir()
            (tmp / "b").mkdir()
            secret = secrets.token_urlsafe(48)
            common = {"DUBHE_REDIS_URL": redis_server.url, "DUBHE_REDIS_PREFIX": prefix,
                      "DUBHE_SECRET_KEY": secret}
            a = start_server(tmp / "a", url, config, workers=2, DUBHE_ACCESS_LOG="true",
                             **common)
            try:
                b = start_server(tmp / "b", url, config, DUBHE_REDIS_FAILURE_POLICY="closed",
                                 **common)
            except BaseException:
                a.running.stop()
                raise
            try:
                yield Cluster(a, b, redis_server)
            finally:
                a.running.stop()
                b.running.stop()
    finally:
        redis_server.stop()
