"""The meter holds a capped key's requests against the key's monthly cap, exactly, however many
workers serve it: two meters (two workers) on one database race one capped key."""

from __future__ import annotations

import asyncio

from dubhe.billing.meter import Denied, Reserved
from dubhe.billing.pricing import cost_uusd
from dubhe.catalog import load_catalog
from tests.billing.conftest import IN_PROCESS_PLANS
from tests.caps.conftest import MAX_TOKENS, PROMPT, CapLedger, reserve, used


async def test_two_workers_never_hold_more_than_the_cap(caps: CapLedger) -> None:
    spec = caps.catalog.models["dubhe-fast"]
    full = cost_uusd(spec, PROMPT, MAX_TOKENS)  # what each request holds
    cap = 7 * full + full // 2  # seven whole holds and half of an eighth
    user = await caps.user("metered")
    await caps.credit(user, 1_000 * full)  # the account could pay for a thousand
    capped, other = await caps.key(user, cap), await caps.key(user, None)
    meters = [caps.meter(), caps.meter()]
    try:
        answers = await asyncio.gather(*(reserve(meters[i % 2], user, capped, cap)
                                         for i in range(40)))
        admitted = [(rid, a, meters[i % 2]) for i, (rid, a) in enumerate(answers)
                    if isinstance(a, Reserved)]
        denied = [a for _, a in answers if isinstance(a, Denied)]
        held = sum(a.admission.balance_uusd for _, a, _ in admitted)
        assert held <= cap
        assert 7 <= len(admitted) and denied
        assert all(a.cap_uusd == cap for a in denied)
        # The half hold left went to a clamped request, not to nothing: the cap is used up to
        # what a request can still be clamped to.
        assert cap - held < cost_uusd(spec, PROMPT, 1) + full // MAX_TOKENS * 2
        # The account itself is far from empty: another key of it still works.
        _, answer = await reserve(meters[0], user, other, None)
        assert isinstance(answer, Reserved)
        meters[0].settle(used(user, other, _, 10), wait=True)
        # Every admitted request uses all it was allowed: spend reaches the cap, never passes.
        for request_id, answer, meter in admitted:
            meter.settle(used(user, capped, request_id, answer.admission.max_tokens), wait=True)
        for meter in meters:
            await meter.flush()
        spent, lease_used = await caps.key_spend(capped)
        assert spent == lease_used <= cap
        assert spent > cap - full
        # Spent out: refused on both workers, from memory or after a refill.
        for meter in meters:
            _, answer = await reserve(meter, user, capped, cap)
            assert isinstance(answer, Denied) and answer.cap_uusd == cap
    finally:
        for meter in meters:
            await meter.stop()
    assert await caps.open_cap_leases(capped) == 0
    spent, lease_used = await caps.key_spend(capped)
    assert spent == lease_used <= cap
    await caps.assert_reconciled(user)


async def test_unused_headroom_returns_and_serves_the_other_worker(caps: CapLedger) -> None:
    """A worker's unused share of the cap returns when its lease goes idle, so the other worker
    can admit up to the whole cap; usage below the hold frees the difference."""
    spec = caps.catalog.models["dubhe-fast"]
    full = cost_uusd(spec, PROMPT, MAX_TOKENS)
    cap = 4 * full
    user = await caps.user("metered")
    await caps.credit(user, 100 * full)
    capped = await caps.key(user, cap)
    first, second = caps.meter(), caps.meter()
    try:
        request_id, answer = await reserve(first, user, capped, cap)
        assert isinstance(answer, Reserved)
        first.settle(used(user, capped, request_id, 0), wait=True)  # the prompt only
        deadline = asyncio.get_running_loop().time() + 10
        while await caps.open_cap_leases(capped) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)  # idle after 0.5 s: returned
        assert await caps.open_cap_leases(capped) == 0
        spent, _ = await caps.key_spend(capped)
        assert spent == cost_uusd(spec, PROMPT, 0)
        answers = [await reserve(second, user, capped, cap) for _ in range(4)]
        assert all(isinstance(a, Reserved) for _, a in answers)
        assert [a.admission.clamped for _, a in answers if isinstance(a, Reserved)] == [
            False, False, False, True]
    finally:
        await first.stop()
        await second.stop()


async def test_an_uncapped_key_never_touches_cap_leases(caps: CapLedger) -> None:
    user = await caps.user("metered")
    await caps.credit(user, 1_000_000)
    key = await caps.key(user, None)
    meter = caps.meter()
    try:
        request_id, answer = await reserve(meter, user, key, None)
        assert isinstance(answer, Reserved)
        meter.settle(used(user, key, request_id, 5), wait=True)
        await meter.flush()
    finally:
        await meter.stop()
    assert meter.caps.all() == []
    spent, lease_used = await caps.key_spend(key)
    assert spent > 0 and lease_used == 0


async def test_a_dead_workers_share_of_the_cap_returns_and_is_never_doubled(
    caps: CapLedger,
) -> None:
    """A worker that dies holding part of the cap pins it until its lease's deadline passes;
    then any worker's sweep frees it. Before that, the others can only use the rest."""
    # Long enough for the living worker to use the rest first, recall included: it recalls the
    # dead worker's free share (on PostgreSQL) and waits ~300 ms for an answer that never comes.
    (caps.tmp / "short.toml").write_text(
        IN_PROCESS_PLANS.replace("reservation_ttl_seconds = 30", "reservation_ttl_seconds = 3"))
    short = CapLedger(caps.engine, caps.sessionmaker, load_catalog(caps.tmp / "short.toml"),
                      caps.tmp)
    spec = short.catalog.models["dubhe-fast"]
    full = cost_uusd(spec, PROMPT, MAX_TOKENS)
    cap = 8 * full
    user = await short.user("metered")
    await short.credit(user, 100 * full)
    capped = await short.key(user, cap)
    dead, alive = short.meter(), short.meter()
    try:
        _, answer = await reserve(dead, user, capped, cap)
        assert isinstance(answer, Reserved)
        assert dead.caps._task is not None
        dying = [*dead._tasks, dead.caps._task]
        for task in dying:  # the worker dies: no heartbeat, nothing returned
            task.cancel()
        await asyncio.gather(*dying, return_exceptions=True)
        pinned = cap // 4  # what the dead worker's first refill took: a quarter of the cap
        admitted = []
        while True:
            request_id, answer = await reserve(alive, user, capped, cap)
            if not isinstance(answer, Reserved):
                break
            admitted.append(request_id)
        assert isinstance(answer, Denied) and answer.cap_uusd == cap
        assert len(admitted) == (cap - pinned) // full
        for request_id in admitted:
            alive.settle(used(user, capped, request_id, 0), wait=True)  # only the prompt
        await alive.flush()
        await asyncio.sleep(3.2)  # the dead lease's deadline passes
        await alive.caps.sweep()
        assert await short.open_cap_leases(capped) <= 1  # only the living worker's
        await asyncio.sleep(1.1)  # past the living worker's refusal from memory
        while True:
            request_id, answer = await reserve(alive, user, capped, cap)
            if not isinstance(answer, Reserved):
                break
            alive.settle(used(user, capped, request_id, answer.admission.max_tokens), wait=True)
        await alive.flush()
        spent_after, lease_used = await short.key_spend(capped)
        assert spent_after == lease_used <= cap
        assert spent_after > cap - full  # the dead worker's share came back
    finally:
        await alive.stop()
        assert dead.spool is not None
        dead.spool.close()
