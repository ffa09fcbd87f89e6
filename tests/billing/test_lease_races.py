"""Races between a worker's leases in memory and the database returning their credit.

The invariant: credit a request holds, or may still be admitted against, is in an OPEN lease in
the database. Every test here has a worker admit, from memory, against credit the database has
already returned to the account, while another worker spends that credit again; each asserts
the outcome (tokens or money served never above what the account or the key's cap had).

Two meters in this process, as two workers; a real database on each backend. Windows are
widened by gating the meter's own housekeeping (a renewal that is late, as on a busy
machine or a slow database), never by touching the counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Any

from sqlalchemy import text

from dubhe.billing.meter import Denied, Meter, Reserved
from dubhe.billing.pricing import cost_uusd
from dubhe.billing.repository import BillingRepository
from tests.billing.conftest import Ledger, admit, event
from tests.caps.conftest import (  # noqa: F401 (caps, caps_database: fixtures)
    MAX_TOKENS,
    PROMPT,
    CapLedger,
    caps,
    caps_database,
    reserve,
    used,
)

INCLUDED = 100  # the "small" plan's tokens (IN_PROCESS_PLANS)


def _meters(ledger: Ledger, **catalog: Any) -> tuple[Meter, Meter]:
    """Two workers; not started (the caller gates their housekeeping first). Renewals every
    0.5 s (a deadline of 1.5 s), sweeps every 0.5 s; leases never go idle during a test."""
    settings = {"reservation_ttl_seconds": 1.5, "lease_idle_seconds": 60.0, **catalog}
    shared = dataclasses.replace(ledger.catalog, **settings)
    return (Meter(ledger.sessionmaker, shared, ledger.tmp / f"spool-a-{secrets.token_hex(2)}"),
            Meter(ledger.sessionmaker, shared, ledger.tmp / f"spool-b-{secrets.token_hex(2)}"))


async def _open_lease(ledger: Ledger, user_id: int) -> int:
    async with ledger.engine.connect() as connection:
        return int((await connection.execute(text(
            "SELECT id FROM leases WHERE user_id = :u AND status = 'open'"),
            {"u": user_id})).scalar_one())


def _settle_if_held(meter: Meter, user_id: int, request_id: str,
                    answer: Reserved | Denied) -> int:
    """Settle an admitted request (5 prompt tokens) as using all the output it held; the
    tokens it was served, 0 if it was refused."""
    if not isinstance(answer, Reserved):
        return 0
    meter.settle(event(user_id, request_id, 5, answer.admission.max_tokens), wait=True)
    return 5 + answer.admission.max_tokens


async def _assert_no_double_spend(ledger: Ledger, user_id: int, served: int) -> None:
    assert served <= INCLUDED, f"served {served} tokens of an account that had {INCLUDED}"
    account = await ledger.assert_reconciled(user_id)
    assert (account["debt_tokens"], account["debt_uusd"], account["uncollected_uusd"]) == (0, 0, 0)


async def test_a_sweep_does_not_close_a_lease_its_owner_has_just_renewed(
        ledger: Ledger) -> None:
    """``Meter.sweep`` reads the expired leases, then closes each in its own transaction, and
    the close (``close_lease``) does not check the deadline again. A renewal that lands in
    between (the owner's heartbeat was late, not dead) is told the lease is open, and the owner
    goes on admitting against it from memory for a whole renewal interval, while the close
    has returned all it did not use (the holds of requests in flight included) to the
    account, where another worker takes it again."""
    user_id = await ledger.user("small")
    a, b = _meters(ledger)
    late = False
    found, renewed, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    lease_id = 0

    heartbeat = a._heartbeat

    async def late_heartbeat() -> None:
        # The renewal is late (a busy machine): it runs once a sweep has found the lease expired.
        if late and not renewed.is_set():
            await found.wait()
            await heartbeat()
            renewed.set()
            return
        await heartbeat()

    a._heartbeat = late_heartbeat  # type: ignore[method-assign]

    def gated(meter: Meter) -> None:
        close = meter._close

        async def sweep_close(closing: int, user: int, **how: bool) -> bool:
            if closing == lease_id:
                # A sweep read the lease as expired; its close commits after the renewal
                # (each worker sweeps: both wait for it).
                found.set()
                await renewed.wait()
                done = await close(closing, user, **how)
                closed.set()
                return done
            return await close(closing, user, **how)

        meter._close = sweep_close  # type: ignore[method-assign]

    gated(a)
    gated(b)
    a.start()
    b.start()
    try:
        first, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)  # the lease took a quarter: 25 tokens, 15 free
        lease_id = await _open_lease(ledger, user_id)
        late = True
        # The sweep's close of the lease it read as expired has run (closing it, or not).
        await asyncio.wait_for(closed.wait(), 15)
        # The owner's renewal said the lease is open: it admits against its 15 free tokens.
        second, mine = await admit(a, user_id, prompt_tokens=5, max_tokens=10)
        # The other worker asks for all the account could have.
        third, other = await admit(b, user_id, prompt_tokens=5, max_tokens=95)
        a.settle(event(user_id, first, 5, 5), wait=True)
        served = (10 + _settle_if_held(a, user_id, second, mine)
                  + _settle_if_held(b, user_id, third, other))
    finally:
        await a.stop()
        await b.stop()
    await _assert_no_double_spend(ledger, user_id, served)


async def test_a_lease_past_its_deadline_admits_nothing_more(ledger: Ledger) -> None:
    """A lease whose renewals stalled for its whole deadline (a database slow for this worker,
    a starved event loop) is closed by any worker's sweep, which returns all it did not use.
    Its owner learns of it only at its next renewal (or a flush of a settlement of that very
    lease): until then it admits against the lease's free credit in memory, credit the account
    has again and another worker spends."""
    user_id = await ledger.user("small")
    a, b = _meters(ledger)
    stalled = asyncio.Event()
    stalled.set()
    closed = asyncio.Event()
    lease_id = 0

    heartbeat = a._heartbeat

    async def stalling_heartbeat() -> None:
        await stalled.wait()
        await heartbeat()

    a._heartbeat = stalling_heartbeat  # type: ignore[method-assign]
    for meter in (a, b):
        def watch(meter: Meter = meter) -> None:
            close = meter._close

            async def sweep_close(closing: int, user: int, **how: bool) -> bool:
                done = await close(closing, user, **how)
                if closing == lease_id:
                    closed.set()
                return done

            meter._close = sweep_close  # type: ignore[method-assign]
        watch()
    a.start()
    b.start()
    try:
        first, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)  # a lease of 25 tokens
        a.settle(event(user_id, first, 5, 5), wait=True)
        await a.flush()  # 10 used, 15 free, no request in flight
        lease_id = await _open_lease(ledger, user_id)
        stalled.clear()  # the renewals stall from here on
        await asyncio.wait_for(closed.wait(), 15)  # past its deadline: swept
        second, mine = await admit(a, user_id, prompt_tokens=5, max_tokens=10)
        # Renewals resume before b spends: left stalled, the lease a has just taken (holding
        # `second`) would be swept in turn 1.5 s later, on a busy machine before b's admission
        # ends, and its hold, returned, would be spent again by b. A worker silent for a
        # whole deadline with requests in flight is a dead one's case (test_crash.py: its
        # usage, arriving after its lease closed, is paid from the account), not this test's.
        stalled.set()
        third, other = await admit(b, user_id, prompt_tokens=5, max_tokens=85)
        served = (10 + _settle_if_held(a, user_id, second, mine)
                  + _settle_if_held(b, user_id, third, other))
    finally:
        stalled.set()
        await a.stop()
        await b.stop()
    await _assert_no_double_spend(ledger, user_id, served)


async def test_a_cap_lease_past_its_deadline_holds_nothing_more(caps: CapLedger) -> None:  # noqa: F811
    """The same for a key's spend cap: a cap lease whose renewals stalled is closed by a sweep
    (``close_expired_cap_leases``: it then counts only what it used), another worker refills
    the key's whole headroom, and the owner still holds requests against the closed lease's
    free headroom in memory: the key spends more than its cap."""
    spec = caps.catalog.models["dubhe-fast"]
    full = cost_uusd(spec, PROMPT, MAX_TOKENS)
    cap = 8 * full
    user = await caps.user("metered")
    await caps.credit(user, 1_000 * full)
    key = await caps.key(user, cap)
    a, b = _meters(caps)
    stalled = asyncio.Event()
    stalled.set()
    swept = asyncio.Event()

    heartbeat = a.caps.heartbeat

    async def stalling_heartbeat() -> None:
        await stalled.wait()
        await heartbeat()

    a.caps.heartbeat = stalling_heartbeat  # type: ignore[method-assign]
    close_expired = BillingRepository.close_expired_cap_leases

    async def watched(self: BillingRepository, now: Any) -> int:
        count = await close_expired(self, now)
        if count and not stalled.is_set():
            # Committed when the sweep's transaction ends: wait for it to end.
            asyncio.get_running_loop().call_later(0.2, swept.set)
        return count

    BillingRepository.close_expired_cap_leases = watched  # type: ignore[method-assign]
    a.start()
    b.start()
    spent_held = 0
    try:
        first, answer = await reserve(a, user, key, cap)
        assert isinstance(answer, Reserved)  # the cap lease took a quarter: 2 full holds
        a.settle(used(user, key, first, MAX_TOKENS), wait=True)
        await a.flush()  # one full hold used, one free
        spent_held += full
        stalled.clear()
        await asyncio.wait_for(swept.wait(), 15)
        # The owner holds against the free headroom of its (closed) cap lease.
        second, mine = await reserve(a, user, key, cap)
        admitted: list[tuple[Meter, str, Reserved]] = []
        if isinstance(mine, Reserved):
            admitted.append((a, second, mine))
        stalled.set()  # before b spends, as in the test above: only the closed lease is stale
        # The other worker takes all the headroom the key has left.
        for _ in range(12):
            request_id, answer = await reserve(b, user, key, cap)
            if not isinstance(answer, Reserved):
                break
            admitted.append((b, request_id, answer))
        for meter, request_id, answer in admitted:
            spent_held += answer.admission.balance_uusd
            meter.settle(used(user, key, request_id, answer.admission.max_tokens), wait=True)
    finally:
        BillingRepository.close_expired_cap_leases = close_expired  # type: ignore[method-assign]
        stalled.set()
        await a.stop()
        await b.stop()
    spent, _ = await caps.key_spend(key)
    assert spent_held <= cap, f"held {spent_held} µUSD against a cap of {cap}"
    assert spent <= cap, f"the key spent {spent} µUSD of a cap of {cap}"


async def test_a_queued_refill_keeps_the_account_lock_it_waits_on(ledger: Ledger) -> None:
    """``_close_idle`` drops the lock of an account that has no live lease once it is not
    ``locked()``; but between a release and the queued waiter's wake-up an ``asyncio.Lock``
    is not ``locked()`` while a waiter is about to take it. Dropped there (the close of the
    account's last lease committing just as a refill that failed releases the lock), the
    waiter refills under the old lock and the next request under a new one, at once: both
    start from no lease, both insert one, and the second replaces the first in ``_leases``
    without retiring it. That lease is never renewed nor closed by its worker; the sweep
    returns all it did not use at its deadline, the hold of the request running on it too,
    and another worker spends that again."""
    user_id = await ledger.user("small")
    a, b = _meters(ledger, lease_idle_seconds=0.5)
    first_close_waits, resume_close = asyncio.Event(), asyncio.Event()
    gated = False

    close = a._close

    async def close_then_wait(lease_id: int, user: int, **how: bool) -> bool:
        nonlocal gated
        done = await close(lease_id, user, **how)
        if not gated:
            gated = True
            first_close_waits.set()
            # Its commit's answer is in; the task resumes when the loop gets to it.
            await resume_close.wait()
        return done

    a._close = close_then_wait  # type: ignore[method-assign]

    refill = a._refill_or_recall
    failures = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            await asyncio.sleep(0.2)  # in its transaction: the next request queues on the lock
            resume_close.set()  # the close's commit answered in the same loop turn...
            raise ConnectionResetError("the database connection dropped")  # ...as this one
        return await refill(*args, **kwargs)

    a._refill_or_recall = failing_once  # type: ignore[method-assign]
    insert_lease = BillingRepository.insert_lease

    async def slow_insert(self: BillingRepository, **kwargs: Any) -> int:
        lease_id = await insert_lease(self, **kwargs)
        await asyncio.sleep(0.3)  # a transaction that takes a moment
        return lease_id

    BillingRepository.insert_lease = slow_insert  # type: ignore[method-assign]
    a.start()
    b.start()
    settle: list[tuple[Meter, str, int]] = []
    served = 0
    try:
        first, answer = await admit(a, user_id, prompt_tokens=5, max_tokens=5)
        assert isinstance(answer, Reserved)
        a.settle(event(user_id, first, 5, 5), wait=True)
        served += 10
        await asyncio.wait_for(first_close_waits.wait(), 10)  # idle: closed
        failures = 1
        failed = asyncio.ensure_future(admit(a, user_id, prompt_tokens=5, max_tokens=15))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(admit(a, user_id, prompt_tokens=5, max_tokens=15))
        try:
            await failed
        except ConnectionResetError:
            pass
        await asyncio.sleep(0.05)  # the queued request is in its refill's transaction
        later = await admit(a, user_id, prompt_tokens=5, max_tokens=15)
        held = [await queued, later]
        for request_id, answer in held:
            if isinstance(answer, Reserved):
                served += 5 + answer.admission.max_tokens
                settle.append((a, request_id, answer.admission.max_tokens))
        # Both requests are still running when every lease of the account past its deadline
        # is swept (1.5 s, renewed every 0.5 s by its worker).
        await asyncio.sleep(3)
        third, other = await admit(b, user_id, prompt_tokens=5, max_tokens=95)
        if isinstance(other, Reserved):
            served += 5 + other.admission.max_tokens
            settle.append((b, third, other.admission.max_tokens))
        for meter, request_id, completion in settle:
            meter.settle(event(user_id, request_id, 5, completion), wait=True)
    finally:
        BillingRepository.insert_lease = insert_lease  # type: ignore[method-assign]
        resume_close.set()
        await a.stop()
        await b.stop()
    await _assert_no_double_spend(ledger, user_id, served)
