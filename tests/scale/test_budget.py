"""The limiter's budgets on their own: exact local GCRA, and the Redis budget shared by several
workers (three ``RedisBudget`` objects, as three workers hold them) against a private Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator

import pytest

from dubhe.catalog import PlanSpec
from dubhe.errors import RateLimited
from dubhe.keys.cache import KeyIdentity
from dubhe.ratelimit import (
    Limits,
    LocalBudget,
    PlanLimiter,
    RedisBudget,
    format_duration,
    redis_client,
)
from dubhe.routing import Breaker, BreakerState, share_breakers
from tests.scale.conftest import RedisServer, start_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def test_reset_durations_read_like_openais() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(1.0) == "1s"
    assert format_duration(360.0) == "6m0s"
    assert format_duration(3723.0) == "1h2m3s"


async def test_local_budget_allows_a_minutes_burst_then_the_rate() -> None:
    limiter = PlanLimiter(LocalBudget())
    limits = Limits(requests_per_minute=30, tokens_per_minute=1000, concurrent=100)
    tickets = [await limiter.admit("u1", limits) for _ in range(30)]
    assert tickets[-1].requests.remaining == 0
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("u1", limits)
    assert refused.value.headers["retry-after"] == "2"  # one request every 2 s
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    # Another account is not touched.
    await limiter.admit("u2", limits)


async def test_answers_that_count_nothing_still_report_the_limits() -> None:
    limiter = PlanLimiter(LocalBudget())
    identity = KeyIdentity(key_id=7, user_id=3, plan_code="p", expires_at=None, revoked=False,
                           rpm_limit=30)
    plan = PlanSpec(code="p", name="P", price_cents=0, models=frozenset(), included_tokens=0,
                    requests_per_minute=600, tokens_per_minute=1000, concurrent_requests=5)
    for _ in range(3):
        (await limiter.admit_key(identity, plan)).finish(0)
    headers = dict(limiter.standing_headers(identity, plan))
    # The key's own rpm (30, not the plan's 600), and what its three requests used.
    assert headers[b"x-ratelimit-limit-requests"] == b"30"
    assert headers[b"x-ratelimit-remaining-requests"] == b"27"
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
    assert headers[b"x-ratelimit-reset-requests"] == b"6s"


async def test_tokens_held_come_back_when_unused() -> None:
    limiter = PlanLimiter(LocalBudget())
    limits = Limits(requests_per_minute=1000, tokens_per_minute=1000, concurrent=100)
    first = await limiter.admit("u1", limits)
    await first.take_tokens(900)
    second = await limiter.admit("u1", limits)
    with pytest.raises(RateLimited):
        await second.take_tokens(200)
    first.finish(used_tokens=50)  # 850 of the 900 held were not used
    await second.take_tokens(200)


async def _shared_concurrency(redis_url: str, prefix: str) -> tuple[int, int]:
    """50 requests arriving over a second at three workers, each held 1.5 s: the most in
    flight at once, and how many were served."""
    budgets = [RedisBudget(redis_client(redis_url), prefix=prefix) for _ in range(3)]
    for budget in budgets:
        budget.start()  # the flusher runs, as in a server: it must not drop a busy subject
    limiters = [PlanLimiter(budget) for budget in budgets]
    limits = Limits(requests_per_minute=100_000, tokens_per_minute=10**8, concurrent=5)
    in_flight = most = served = 0

    async def one(i: int) -> None:
        nonlocal in_flight, most, served
        await asyncio.sleep(random.random())
        try:
            ticket = await limiters[i % 3].admit("k1", limits)
        except RateLimited:
            return
        in_flight += 1
        served += 1
        most = max(most, in_flight)
        await asyncio.sleep(1.5)
        in_flight -= 1
        ticket.finish(0)

    try:
        await asyncio.gather(*(one(i) for i in range(50)))
    finally:
        for budget in budgets:
            await budget.stop()
    return most, served


async def test_concurrency_is_shared_by_every_worker(redis_server: RedisServer) -> None:
    most, served = await _shared_concurrency(redis_server.url, "c1:")
    assert most == 5
    assert served >= 5


async def test_slots_idle_on_one_worker_are_recalled_by_another(
    redis_server: RedisServer,
) -> None:
    budgets = [RedisBudget(redis_client(redis_server.url), prefix="rc1:") for _ in range(2)]
    for budget in budgets:
        budget.start()
    first, second = (PlanLimiter(budget) for budget in budgets)
    limits = Limits(requests_per_minute=100_000, tokens_per_minute=10**8, concurrent=3)
    try:
        await asyncio.sleep(0.2)  # both listen for recalls
        tickets = [await first.admit("k1", limits) for _ in range(3)]
        with pytest.raises(RateLimited):  # all three slots are in use: no recall frees one
            await second.admit("k1", limits)
        for ticket in tickets:
            ticket.finish(0)
        await asyncio.sleep(0.1)  # past the refusal's short back-off
        # The first worker keeps its idle slots for the next request; the second recalls them.
        again = [await second.admit("k1", limits) for _ in range(3)]
        with pytest.raises(RateLimited):
            await first.admit("k1", limits)
        for ticket in again:
            ticket.finish(0)
        assert budgets[1].recalls >= 1
    finally:
        for budget in budgets:
            await budget.stop()


async def test_requests_per_minute_are_shared_by_every_worker(redis_server: RedisServer) -> None:
    budgets = [RedisBudget(redis_client(redis_server.url), prefix="r1:") for _ in range(3)]
    limiters = [PlanLimiter(budget) for budget in budgets]
    limits = Limits(requests_per_minute=120, tokens_per_minute=10**8, concurrent=1000)
    served = 0
    for i in range(300):
        try:
            (await limiters[i % 3].admit("k1", limits)).finish(0)
            served += 1
        except RateLimited:
            pass
    for budget in budgets:
        await budget.stop()
    # A minute's burst (120), plus what refills while the loop runs (2 a second).
    assert 120 <= served <= 126, served
    # Slices: far fewer round trips than requests.
    assert sum(budget.round_trips for budget in budgets) < 200




async def test_the_flusher_never_forgets_a_subject_awaiting_redis(
    redis_server: RedisServer,
) -> None:
    budget = RedisBudget(redis_client(redis_server.url), prefix="f1:")
    limiter = PlanLimiter(budget)
    limits = Limits(requests_per_minute=100_000, tokens_per_minute=10**8, concurrent=1)
    first = asyncio.ensure_future(limiter.admit("k1", limits))
    await asyncio.sleep(0)  # it now waits on Redis for its slot
    await budget.flush()  # the background flush runs at that moment
    ticket = await first
    with pytest.raises(RateLimited):
        await limiter.admit("k1", limits)
    ticket.finish(0)
    await budget.stop()


async def _until(condition: Callable[[], bool], seconds: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_breaker_opened_on_one_worker_opens_on_the_others(
    redis_server: RedisServer,
) -> None:
    budgets = [RedisBudget(redis_client(redis_server.url), prefix="br1:") for _ in range(2)]
    breakers = [Breaker("gpu-a", failures=3, cooldown=30) for _ in budgets]
    for budget, breaker in zip(budgets, breakers, strict=True):
        share_breakers(budget, {"gpu-a": breaker, "gpu-b": Breaker("gpu-b", failures=3,
                                                                    cooldown=30)})
        budget.start()
    first, second = breakers
    try:
        await asyncio.sleep(0.2)  # both listen
        now = time.monotonic()
        for _ in range(3):
            first.failed(now)
        assert first.state is BreakerState.OPEN
        assert await _until(lambda: second.state is BreakerState.OPEN)
        assert not second.usable(time.monotonic())
        assert 25 < second.retry_in(time.monotonic()) <= 30
        # The first worker's trial succeeds: every worker closes.
        first.take(now + 31)
        first.succeeded()
        assert await _until(lambda: second.state is BreakerState.CLOSED)
        assert second.usable(time.monotonic())
        # An upstream's retry-after seen by the second pauses the deployment on the first.
        second.failed(time.monotonic(), retry_after=20)
        assert await _until(lambda: not first.usable(time.monotonic(), alone=True))
        assert first.state is BreakerState.CLOSED  # a pause, not a failure of its own
    finally:
        for budget in budgets:
            await budget.stop()
