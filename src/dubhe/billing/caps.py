"""Per-key monthly spend caps, exact across workers and instances.

A key may carry a cap in µUSD per calendar month (UTC). What counts is the key's spend: the
``cost_uusd`` of its usage records (what its requests cost beyond included tokens), the same
figure the keys list shows. The cap holds the way an account's credit does (``meter.py``):

1. **Lease.** A worker takes a slice of the key's headroom this month in ONE transaction: the
   key's account row locked (the lock every settlement of the key's usage takes first too, so
   the two are serialised and cannot deadlock; on SQLite the transaction holds the write lock),
   ``headroom = cap - committed`` computed from the month's cap leases (an open lease counts
   what it was granted, a closed one what it used), and a new or grown lease of at most that
   headroom. A quarter of the headroom (at least what the request needs) per
   refill: few refills for a roomy cap, exact admission for the last cents of a tight one.
2. **Admit** in memory: a capped key's request holds what it may cost beyond included tokens
   against both the account's lease and the key's cap lease, clamped to the smaller
   (``lease.admit_capped``); a request without ``max_tokens`` gets the largest output the cap
   allows; one the cap cannot pay a single output token for gets 402 naming the cap.
3. **Settle**: the request's price returns the rest of its hold to the cap lease; the flush
   adds it to the lease's ``uusd_used`` in the transaction that writes its usage record.
4. **Return**: an idle lease is closed once its settlements are flushed; a lease whose worker
   stopped renewing it is closed by any worker's sweep (its usage, replayed from the dead
   worker's spool, still adds to ``uusd_used``, so it still counts).

5. **Recall** (PostgreSQL), as for accounts (``meter.py``): a refill that finds the headroom
   short of a request while another worker's cap lease of the key holds some unused takes
   nothing and notifies ``dubhe_recall`` with ``"<user id> <key id>"``; every worker gives back
   the free headroom of its cap leases of that key (``give_back``; the account's leases are
   left alone), and the short worker tries again over ~300 ms before a last refill clamps or
   refuses.

An uncapped key costs nothing of this: the meter checks for a cap once per request, in memory.
What is given up, as for accounts: on SQLite (no NOTIFY) a request may be refused while another
worker's cap lease still holds the key's last headroom, until that lease goes idle
(``lease_idle_seconds``). What
the cap cannot stop is usage beyond a request's hold (an upstream that ignored the output limit
it was sent): it is charged in full and recorded, and the key is refused from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.billing import service
from dubhe.billing.lease import ADMIT_SHARE, CapLease, RefillOutcome
from dubhe.billing.pricing import format_usd
from dubhe.billing.repository import BillingRepository
from dubhe.models.base import utcnow

log = logging.getLogger(__name__)

# A refill takes this share of the key's headroom (at least what the request needs).
_LEASE_SHARE = 4


def month_start(now: datetime) -> datetime:
    """Caps are per calendar month, UTC (the keys list sums spend from the same moment)."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


def cap_message(cap_uusd: int) -> str:
    """The 402 of a request its key's cap cannot pay for."""
    whole, micro = format_usd(cap_uusd).split(".")
    amount = f"{whole}.{micro.rstrip('0').ljust(2, '0')}"  # 25.00, 0.0002: as it was set
    return (
        f"This API key's monthly spend cap of ${amount} is reached: what it has "
        "spent this month plus what its requests in flight hold leaves too little for this "
        "request (held credit returns seconds after they end). The cap resets on the 1st of "
        "the month (UTC); use another key, or create a key with a higher cap in the dashboard."
    )


class CapBook:
    """This worker's cap leases, one per capped key it has served recently."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession],
                 owner: Callable[[], str], ttl_seconds: float) -> None:
        self._sessionmaker = sessionmaker
        self._owner = owner
        self._ttl_seconds = ttl_seconds
        self._leases: dict[int, CapLease] = {}
        self._retiring: list[CapLease] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, close_idle: Callable[[], Awaitable[None]]) -> None:
        """Run the housekeeping: ``close_idle`` (the meter's: it flushes first) four times a
        second, renewals every third of the lease deadline, the sweep of dead workers' leases."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(close_idle), name="cap-leases")

    async def stop(self) -> None:
        """End the housekeeping between two jobs: never cancelled inside a transaction, which
        would hand the pool a connection in the middle of a query."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None

    async def _run(self, close_idle: Callable[[], Awaitable[None]]) -> None:
        jobs = [(0.25, close_idle), (self._ttl_seconds / 3, self.heartbeat),
                (max(0.5, self._ttl_seconds / 4), self.sweep)]
        due = [time.monotonic() + every for every, _ in jobs]
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), 0.25)
            except TimeoutError:
                pass
            for index, (every, job) in enumerate(jobs):
                if self._stopping.is_set():
                    return
                if time.monotonic() >= due[index]:
                    due[index] = time.monotonic() + every
                    try:
                        await job()
                    except Exception:
                        log.exception("cap lease housekeeping failed; retrying at the next interval")

    def live(self, key_id: int) -> CapLease | None:
        """The key's cap lease, if this worker holds one for the current month."""
        cap = self._leases.get(key_id)
        if cap is not None and (time.time() >= cap.month_end
                                or time.monotonic() >= cap.admits_until):
            self.retire(cap)  # a new month; or its renewals are late (``ADMIT_SHARE``)
            return None
        return cap

    async def refill(self, user_id: int, key_id: int, cap_uusd: int, need_uusd: int, *,
                     recall: bool = False, scarce: bool = False) -> tuple[CapLease, RefillOutcome]:
        """Take more of the key's headroom this month into this worker's lease (one
        transaction). The lease returned may hold less than ``need_uusd``: all that was left.

        With ``recall``: when the headroom left cannot cover ``need_uusd`` while another
        worker's cap lease of the key holds some unused, take nothing and recall it (the
        account's ``dubhe_recall``, on commit): ``"recalled"``; the caller tries again. With
        ``scarce`` (a recall of the account lately), take only what the lease lacks.

        The lease returned is live: one retired while the transaction ran may be closing, and
        closed it counts only what it used, so a request held against it would pass the cap.
        Then the refill is done again, into a new lease."""
        while True:
            cap, outcome = await self._refill_once(user_id, key_id, cap_uusd, need_uusd,
                                                   recall=recall, scarce=scarce)
            if not cap.retired:
                return cap, outcome

    async def _refill_once(self, user_id: int, key_id: int, cap_uusd: int, need_uusd: int, *,
                           recall: bool, scarce: bool) -> tuple[CapLease, RefillOutcome]:
        now = utcnow()
        started = time.monotonic()
        month = month_start(now)
        current = self._leases.get(key_id)
        if current is not None and (current.month_start != month
                                    or started >= current.admits_until):
            self.retire(current)
            current = None
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            await repository.lock_accounts([user_id])
            stored = await repository.key_cap(key_id)
            cap = stored if stored is not None else cap_uusd
            headroom = max(0, cap - await repository.cap_committed(key_id, month))
            free = current.free if current is not None else 0
            if scarce:
                take = min(headroom, max(0, need_uusd - free))
            else:
                take = min(headroom, max(need_uusd, headroom // _LEASE_SHARE))
            outcome: RefillOutcome = "took"
            if recall and free + take < need_uusd:
                outcome = "alone"
                if (repository.can_recall
                        and await repository.others_hold_headroom(key_id, month, self._owner())):
                    await repository.recall_leases(user_id, key_id)
                    take = 0
                    outcome = "recalled"
            lease_id = current.id if current is not None else 0
            if lease_id and take and not await repository.grow_cap_lease(lease_id, take):
                lease_id = 0  # closed under us (its deadline passed): start a new one
            if not lease_id:
                lease_id = await repository.insert_cap_lease(
                    key_id=key_id, owner=self._owner(), month_start=month, uusd=take,
                    expires_at=service.lease_deadline(now, self._ttl_seconds), now=now)
        # Committed: only now does the headroom exist in memory.
        if current is None or current.id != lease_id:
            if current is not None:
                self.retire(current)
            current = CapLease(id=lease_id, key_id=key_id, user_id=user_id, cap_uusd=cap,
                               month_start=month,
                               month_end=next_month(month).timestamp(), free=0,
                               last_used=time.monotonic(),
                               admits_until=started + self._ttl_seconds * ADMIT_SHARE)
            self._leases[key_id] = current
        current.cap_uusd = cap
        current.free += take
        return current, outcome

    def holds_free(self, key_id: int) -> bool:
        """Whether this worker's cap leases of the key hold free headroom."""
        return any(cap.key_id == key_id and cap.id and cap.free > 0 for cap in self.all())

    async def give_back(self, user_id: int, key_id: int) -> None:
        """Return the free headroom of this worker's cap leases of the key (another worker
        recalled it), in one short transaction; what requests in flight hold stays. The key's
        account row is locked first, as every refill and settlement of its usage does."""
        taken = []
        for cap in self.all():
            if cap.key_id == key_id and cap.id and cap.free > 0:
                taken.append((cap, cap.free))
                cap.free = 0  # out of memory first: nothing is held against it from here on
                cap.recalls += 1
        if not taken:
            return
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            await repository.lock_accounts([user_id])
            for cap, free in sorted(taken, key=lambda item: item[0].id):
                # False: closed already, or the guard refused; either way the headroom counts
                # what the lease used once it closes, never more.
                await repository.shrink_cap_lease(cap.id, free)

    def retire(self, cap: CapLease) -> None:
        """No new holds; closed once its requests have settled and been flushed."""
        if not cap.retired:
            cap.retired = True
            self._retiring.append(cap)
        if self._leases.get(cap.key_id) is cap:
            del self._leases[cap.key_id]

    def drained(self, idle_seconds: float, admitting: Callable[[int], bool]) -> list[CapLease]:
        """Retire the idle leases (and those of an ended month); return the retired leases no
        request holds any more, to be closed once the settlements are flushed. A lease whose
        account has a request being admitted (``admitting(user id)``: a refill may be growing
        it) is not idle."""
        moment, now = time.monotonic(), time.time()
        for cap in list(self._leases.values()):
            if now >= cap.month_end or (cap.in_flight == 0 and moment - cap.last_used > idle_seconds
                                        and not admitting(cap.user_id)):
                self.retire(cap)
        return [cap for cap in self._retiring if cap.in_flight == 0]

    async def close(self, caps: list[CapLease]) -> None:
        """Close leases whose settlements are all flushed: they then count only what they used."""
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            for cap in sorted(caps, key=lambda cap: cap.id):
                await repository.close_cap_lease(cap.id, now)
        for cap in caps:
            if cap in self._retiring:
                self._retiring.remove(cap)

    def all(self) -> list[CapLease]:
        return [*self._leases.values(), *self._retiring]

    async def heartbeat(self) -> None:
        """Renew this worker's cap leases; one found closed (its deadline passed while renewals
        failed) serves no new request."""
        caps = self.all()
        if not caps:
            return
        started = time.monotonic()
        until = service.lease_deadline(utcnow(), self._ttl_seconds)
        async with self._sessionmaker() as session, session.begin():
            still_open = await BillingRepository.from_session(session).extend_cap_leases(
                [cap.id for cap in caps], until)
        for cap in caps:
            if cap.id in still_open:
                cap.admits_until = started + self._ttl_seconds * ADMIT_SHARE
            elif not cap.retired:
                self.retire(cap)

    async def sweep(self) -> None:
        """Close every cap lease whose worker stopped renewing it."""
        async with self._sessionmaker() as session, session.begin():
            await BillingRepository.from_session(session).close_expired_cap_leases(utcnow())
