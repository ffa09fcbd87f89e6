"""The plan limiter's CPU per request, alone: ``python bench/ratelimit.py``.

Admits, counts tokens for and finishes N requests on one account, through the local budget and
through the Redis budget (a private ``redis-server`` on a free port, three workers' budgets in one
process), and prints CPU microseconds per request and Redis round trips per request. The gateway's
own numbers (``make bench``) include this cost, since the limiter is on in every run.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

from dubhe.errors import RateLimited
from dubhe.ratelimit import Limits, LocalBudget, PlanLimiter, RedisBudget, redis_client

REQUESTS = 20_000
LIMITS = Limits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent=10**6)


async def _run(limiters: list[PlanLimiter]) -> float:
    started = time.process_time()
    for i in range(REQUESTS):
        ticket = await limiters[i % len(limiters)].admit("u1", LIMITS)
        await ticket.take_tokens(1200)
        ticket.headers()
        ticket.finish(300)
    return (time.process_time() - started) / REQUESTS * 1e6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _refusals() -> float:
    """A key over its requests per minute: what a refusal costs the limiter (the 429's body
    and headers included, not the HTTP framing)."""
    limiter = PlanLimiter(LocalBudget())
    tight = Limits(requests_per_minute=1, tokens_per_minute=10**6, concurrent=10)
    (await limiter.admit("u1", tight)).finish(0)
    started = time.process_time()
    for _ in range(REQUESTS):
        try:
            await limiter.admit("u1", tight)
        except RateLimited as error:
            error.body()
    return (time.process_time() - started) / REQUESTS * 1e6


async def _shared(port: int) -> tuple[float, float]:
    budgets = [RedisBudget(redis_client(f"redis://127.0.0.1:{port}/0"), prefix="bench:")
               for _ in range(3)]
    shared = await _run([PlanLimiter(budget) for budget in budgets])
    trips = sum(budget.round_trips for budget in budgets) / REQUESTS
    for budget in budgets:
        await budget.stop()
    return shared, trips


def main() -> None:
    local = asyncio.run(_run([PlanLimiter(LocalBudget())]))
    print(f"local budget: {local:.1f} µs CPU per request (admit, tokens, headers, finish)")
    print(f"a refusal (429 rate_limit_exceeded): {asyncio.run(_refusals()):.1f} µs CPU")
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server not installed: the Redis budget was not measured")
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen([binary, "--port", str(port), "--save", "", "--dir", directory],
                                  stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            shared, trips = asyncio.run(_shared(port))
            print(f"redis budget: {shared:.1f} µs CPU per request, {trips:.4f} Redis round "
                  "trips per request")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
