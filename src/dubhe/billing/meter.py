"""The meter: admission and settlement of every request, against credit leased per worker.

The hot path never waits on the database while credit lasts:

1. **Lease.** The first request of an account (and any that finds the lease short) takes a slice
   of the account's credit in ONE short transaction: the account row locked (``BEGIN IMMEDIATE``
   on SQLite, ``FOR UPDATE`` on PostgreSQL), the period renewed if it ended, and a guarded update
   moving a quarter of what is available (at least what the request needs) from available to
   reserved. The slice shrinks as the account empties, so the last requests an account can pay for
   are admitted against exactly what is left: never more.
2. **Admit** in memory against the lease: the prompt plus ``max_tokens`` is held, or clamped to
   what the lease holds, or refused.
3. **Settle** in memory: the real usage is charged and the rest returned to the lease; the usage is
   appended to this worker's local spool (``spool.py``) before the client sees the end of its answer.
4. **Flush** every 100 ms: the spooled settlements go to the database in one transaction (usage
   records, one ledger entry per request, one guarded update per account). Unused credit returns to
   the account when the lease has been idle for ``lease_idle_seconds``, or at shutdown.

Crash safety: a SIGKILL loses no spooled usage (the kernel holds the written bytes; the next worker
on the machine replays a dead worker's spool), and cannot overspend, because the lease was taken
out of the account up front. Workers renew their leases' deadlines; a sweeper in every worker
returns the unused part of leases whose deadline passed (``reservation_ttl_seconds``), if it is
still past when the close commits. A worker admits against a lease only until three quarters
of the deadline after its last renewal began (``lease.ADMIT_SHARE``), and retires one a renewal
finds closed: whatever a late sweep returns, no new request is held against it.

Usage beyond a request's hold (an upstream that ignored its output limit) is charged in full:
from the lease's free credit in memory, then, at flush time and under the account lock, from the
account's available credit; only what the account cannot pay becomes debt (``service.
settle_usage``). A debt bumps the account's epoch. On PostgreSQL a trigger pushes every epoch
change to every worker (``epoch_moved``, through ``dubhe.pubsub``); each worker also reads the
epochs of the accounts it holds leases for once a second (one query, the fallback) and retires a
lease of an older epoch: no new admissions, in-flight requests settle, then its unused credit
returns (repaying the debt first). So a debt, or a plan change, stops admission on every worker
at once (within about a second at worst), and an account in debt is refused (402) until a
credit repays it.

**Recall** (PostgreSQL). A refill that finds the account short of a request while other workers'
leases hold some of its credit takes nothing and notifies ``dubhe_recall`` (the account id, on
commit). Every worker gives back the free part of its leases of that account in one short
transaction (``_give_back``: the lease shrinks, never below what it used plus what requests in
flight hold), and the short worker tries again over ~300 ms (``_refill_or_recall``), admitting as
soon as the account covers the request; only a last refill may clamp or refuse (402). After a
recall, refills of the account take only what their request lacks for a while, so the last
credit is not scattered again. The recall runs under the account's lock: one per account and
worker at a time, and the requests behind a refusal are refused from memory for a second.

The balance headers report the account (``_balance``): available plus what every lease holds
unused, as last read (each refill, and the once-a-second epoch query) less what this worker has
settled since; no query per request.

A settlement the database cannot take must not block the others: records are validated before
any SQL (``spool.record_problem``), and a batch the database still refuses is split until the
refused record is found; that record is set aside in the dead-letter file with an ERROR line
(``Meter.dead_letters`` counts them), and the rest are written. Only a database that cannot be
reached keeps a batch waiting.

What is given up: on SQLite (one machine, no NOTIFY) there is no recall, so with several workers
a request may be refused while another worker's lease still holds the account's last credit,
until that lease goes idle; on PostgreSQL, a request refused after the ~300 ms recall while a
worker was too slow to answer it. A request admitted on another worker before it learns of a
debt runs against that worker's lease. A worker whose renewals stop reaching the database for
a whole deadline (``reservation_ttl_seconds``, 120 s by default) has its leases swept as if it
had died: a request still running on one is then charged from the account when it ends, as
debt if the account has been spent meanwhile. Nothing else is ever overspent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.billing import service
from dubhe.billing.caps import CapBook
from dubhe.billing.lease import (
    ADMIT_SHARE,
    CapLease,
    Hold,
    LiveLease,
    NotAdmitted,
    RefillOutcome,
    admit,
    admit_capped,
    settle,
)
from dubhe.billing.pricing import Admission, cost_uusd, size_admission
from dubhe.billing.repository import BillingRepository, GuardFailed
from dubhe.billing.spool import MAX_TOKEN_COUNT, DeadLetters, Spool, read_records, record_problem
from dubhe.catalog import Catalog, ModelSpec
from dubhe.errors import DubheError
from dubhe.immutable import immutable
from dubhe.models.base import utc_isoformat, utcnow
from dubhe.usage.events import UsageEvent

log = logging.getLogger(__name__)

_FLUSH_SECONDS = 0.1
# Settlements per flush transaction. Under load each of a flush's ~9 statements waits ~40 ms for
# the busy event loop to take its result back, whatever its size: 500 records a transaction
# wrote ~1,200 a second while one worker served ~3,500, and the database fell 50,000 rows behind
# in 20 s. 2,000 keep up (one transaction's Python work, ~9 ms at most between two statements,
# is still a short stall).
_FLUSH_RECORDS = 2000
# A refill takes this share of what the account has available (at least what the request needs):
# few refills for a rich account, exact admission for the last credit of a poor one.
_LEASE_SHARE = 4
# After a refill finds the account empty, or in debt, refuse from memory for this long.
_EXHAUSTED_SECONDS = 1.0
# How often each worker reads the epochs of the accounts it holds leases for (the fallback:
# PostgreSQL pushes every epoch change at once, ``dubhe.pubsub``).
_EPOCH_REFRESH_SECONDS = 1.0
# A refill that finds the account short while other workers' leases hold its credit takes
# nothing, recalls that credit (``dubhe_recall``) and tries again after each of these pauses
# (~300 ms in all); then a last refill takes whatever is there (a clamp) or refuses.
_RECALL_PAUSES = (0.02, 0.04, 0.08, 0.16)
# For this long after a recall of an account is sent or heard, refills take only what their
# request needs, not a share of what is left: the last credit stays in the account, where the
# next worker short of it finds it, instead of in one worker's lease.
_SCARCE_SECONDS = 2.0
# What makes the database refuse one batch of records but not another: the records themselves
# (a constraint, a value out of range, an account that cannot cover a guarded update, a user
# that no longer exists). Anything else (the database unreachable or locked) is retried whole.
_REFUSALS = (IntegrityError, DataError, GuardFailed, DubheError, KeyError, TypeError, ValueError)


@immutable
class Balance:
    """An account's spendable position as this worker sees it, for response headers."""

    tokens_remaining: int
    balance_uusd: int


@immutable
class Reserved:
    admission: Admission
    balance: Balance


@immutable
class Denied:
    balance: Balance
    # What the account owes: refused until a credit repays it (``service.debt_message``).
    debt_uusd: int = 0
    # Refused by the key's monthly spend cap (``caps.cap_message``), not by the account.
    cap_uusd: int | None = None


@immutable
class SettleResult:
    cost_uusd: int
    balance: Balance


class Meter:
    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], catalog: Catalog, spool_dir: Path,
        *, read_sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        # The once-a-second epoch poll only reads: it must not queue behind writers.
        self._read_sessionmaker = read_sessionmaker or sessionmaker
        self._catalog = catalog
        self._spool_dir = spool_dir
        self.spool: Spool | None = None
        self._leases: dict[int, LiveLease] = {}
        self._retiring: list[LiveLease] = []
        self._holds: dict[str, Hold] = {}
        # Accounts a refill found in debt: (what they owe, refused from memory until).
        self._debtors: dict[int, tuple[int, float]] = {}
        self.dead_letters = 0  # records set aside since start, for metrics
        self._dead_letter_file: DeadLetters | None = None
        self._account_locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        # How many requests hold or wait for each account's lock (``_account_lock``): a lock
        # with a waiter is not ``locked()`` between its release and the waiter's wake-up.
        self._lock_users: dict[int, int] = {}
        self._pending: list[dict[str, Any]] = []
        self._unflushed_files: list[Path] = []
        self._flush_lock = asyncio.Lock()
        self._flush_now = asyncio.Event()
        # Set by stop(): each housekeeping loop ends between two jobs (see _every).
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._counting: set[asyncio.Future[None]] = set()
        # What this worker has settled and not yet written, per account: [tokens, uusd].
        self._unflushed: dict[int, list[int]] = {}
        # How many flushes have struck their records off ``_unflushed``: a read of the accounts
        # that a flush overtook cannot tell whether it counted that flush's records (``_saw``).
        self._flushes_written = 0
        # Accounts recalled lately (``_SCARCE_SECONDS``), and those whose leases this worker is
        # giving back right now.
        self._scarce: dict[int, float] = {}
        self._scarce_keys: dict[int, float] = {}
        self._giving_back: set[tuple[int, int | None]] = set()
        self._background: set[asyncio.Future[None]] = set()
        self.caps = CapBook(sessionmaker, lambda: self._owner, catalog.reservation_ttl_seconds)

    # -- the hot path ---------------------------------------------------------------------------

    async def reserve(self, *, user_id: int, request_id: str, api_key_id: int | None, model: str,
                      prompt_tokens: int, max_tokens: int, n: int = 1,
                      spend_cap_uusd: int | None = None) -> Reserved | Denied:
        """Hold the prompt plus ``max_tokens`` for each of ``n`` choices (or a clamped limit);
        for a key with a monthly spend cap, within what the cap has left too."""
        spec = self._catalog.models[model]
        if spend_cap_uusd is not None and api_key_id is not None:
            return await self._reserve_capped(user_id, request_id, api_key_id, spend_cap_uusd,
                                              spec, prompt_tokens, max_tokens, n)
        answer = self._from_lease(user_id, request_id, spec, prompt_tokens, max_tokens, n)
        if answer is not None:
            return answer
        async with self._account_lock(user_id):
            # Another request may have refilled the lease while this one waited.
            answer = self._from_lease(user_id, request_id, spec, prompt_tokens, max_tokens, n)
            if answer is not None:
                return answer
            completion = max_tokens * n
            lease = await self._refill_or_recall(
                user_id, prompt_tokens + completion, cost_uusd(spec, prompt_tokens, completion),
                _fits(spec, prompt_tokens, max_tokens, n))
            if lease is None:
                return self._owing(user_id)
            # The lease now holds all the account could give, if that was less than asked for.
            admitted = admit(lease, spec, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                             n=n, final=True)
            if admitted is None or admitted[1].clamped:
                lease.exhausted_until = time.monotonic() + _EXHAUSTED_SECONDS
            if admitted is None:
                return Denied(Balance(lease.tokens_remaining, lease.uusd_remaining))
            return self._hold(request_id, lease, *admitted)

    def _from_lease(self, user_id: int, request_id: str, spec: ModelSpec, prompt_tokens: int,
                    max_tokens: int, n: int) -> Reserved | Denied | None:
        """Admit from memory when the lease covers the request; None when it needs a refill."""
        if user_id in self._debtors:
            if self._debtors[user_id][1] > time.monotonic():
                return self._owing(user_id)
            del self._debtors[user_id]
        lease = self._leases.get(user_id)
        moment = time.monotonic()
        if lease is None or moment >= lease.admits_until or self._period_over(lease):
            return None
        exhausted = lease.exhausted_until > moment
        admitted = admit(lease, spec, prompt_tokens=prompt_tokens, max_tokens=max_tokens, n=n,
                         final=exhausted)
        if admitted is not None:
            return self._hold(request_id, lease, *admitted)
        if exhausted:
            return Denied(Balance(lease.tokens_remaining, lease.uusd_remaining))
        return None

    def _owing(self, user_id: int) -> Denied:
        return Denied(Balance(0, 0), debt_uusd=self._debtors[user_id][0])

    def _hold(self, request_id: str, lease: LiveLease, hold: Hold, admission: Admission) -> Reserved:
        self._holds[request_id] = hold
        return Reserved(admission, self._balance(lease))

    def _balance(self, lease: LiveLease) -> Balance:
        """The account's position for the response headers: its unspent credit (available plus
        what every worker's leases hold unused, requests in flight included) as of this
        worker's last read (at most about a second ago), less what this worker has settled
        since. No query per request."""
        if lease.unspent is None:
            return Balance(lease.tokens_remaining, lease.uusd_remaining)
        return Balance(max(0, lease.unspent[0]), max(0, lease.unspent[1]))

    async def _reserve_capped(self, user_id: int, request_id: str, key_id: int, cap_uusd: int,
                              spec: ModelSpec, prompt_tokens: int, max_tokens: int,
                              n: int) -> Reserved | Denied:
        """``reserve`` for a capped key: held against the account's lease and the key's cap
        lease (``caps.py``); whichever is short is refilled, each in its own transaction."""
        answer = self._from_capped(user_id, request_id, key_id, spec, prompt_tokens, max_tokens, n)
        if answer is not None:
            return answer
        async with self._account_lock(user_id):
            answer = self._from_capped(user_id, request_id, key_id, spec, prompt_tokens,
                                       max_tokens, n)
            if answer is not None:
                return answer
            completion = max_tokens * n
            need_uusd = cost_uusd(spec, prompt_tokens, completion)
            while True:
                moment = time.monotonic()
                lease = self._leases.get(user_id)
                if (lease is None or moment >= lease.admits_until or self._period_over(lease)
                        or (lease.exhausted_until <= moment
                            and not _covers(lease, spec, prompt_tokens, max_tokens, n))):
                    lease = await self._refill_or_recall(
                        user_id, prompt_tokens + completion, need_uusd,
                        _fits(spec, prompt_tokens, max_tokens, n))
                    if lease is None:
                        return self._owing(user_id)
                # What the request may cost beyond the included tokens the account's lease holds.
                sized = size_admission(spec, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                       n=n, tokens_available=lease.tokens_free,
                                       balance_uusd=max(need_uusd, lease.uusd_free))
                cap_need = sized.balance_uusd if sized is not None else need_uusd
                cap = self.caps.live(key_id)
                if cap is None or (cap.free < cap_need and cap.exhausted_until <= moment):
                    cap = await self._cap_refill_or_recall(user_id, key_id, cap_uusd, cap_need)
                # The account's lease retired while the cap's refill ran (it may be closing,
                # its unused credit on the way back to the account): start again.
                if not lease.retired:
                    break
            # Both leases now hold all they could give, if that was less than asked for.
            cap_binds = cap.free < lease.uusd_free
            admitted = admit_capped(lease, cap, spec, prompt_tokens=prompt_tokens,
                                    max_tokens=max_tokens, n=n, final=True, cap_final=True)
            if isinstance(admitted, str) or admitted[1].clamped:
                if cap_binds:
                    cap.exhausted_until = time.monotonic() + _EXHAUSTED_SECONDS
                else:
                    lease.exhausted_until = time.monotonic() + _EXHAUSTED_SECONDS
            if isinstance(admitted, str):
                return self._refused(lease, cap, admitted)
            return self._hold(request_id, lease, *admitted)

    def _from_capped(self, user_id: int, request_id: str, key_id: int, spec: ModelSpec,
                     prompt_tokens: int, max_tokens: int, n: int) -> Reserved | Denied | None:
        """Admit a capped key's request from memory; None when a lease needs a refill."""
        if user_id in self._debtors:
            if self._debtors[user_id][1] > time.monotonic():
                return self._owing(user_id)
            del self._debtors[user_id]
        lease = self._leases.get(user_id)
        cap = self.caps.live(key_id)
        moment = time.monotonic()
        if (lease is None or cap is None or moment >= lease.admits_until
                or self._period_over(lease)):
            return None
        admitted = admit_capped(lease, cap, spec, prompt_tokens=prompt_tokens,
                                max_tokens=max_tokens, n=n, final=lease.exhausted_until > moment,
                                cap_final=cap.exhausted_until > moment)
        if admitted == "refill":
            return None
        if isinstance(admitted, str):
            return self._refused(lease, cap, admitted)
        return self._hold(request_id, lease, *admitted)

    @staticmethod
    def _refused(lease: LiveLease, cap: CapLease, why: NotAdmitted) -> Denied:
        balance = Balance(lease.tokens_remaining, lease.uusd_remaining)
        return Denied(balance, cap_uusd=cap.cap_uusd if why == "cap" else None)

    def holds(self, request_id: str) -> bool:
        """Whether the request still holds credit (it was admitted and not settled yet)."""
        return request_id in self._holds

    def settle(self, event: UsageEvent, *, wait: bool) -> SettleResult | None:
        """Charge a finished request. With ``wait`` (the client is still there), tokens the
        upstream did not report are counted now; otherwise off the response path."""
        hold = self._holds.pop(event.request_id, None)
        if hold is None:
            log.error("settlement of %s without a hold", event.request_id)
            return None
        _distrust_bad_counts(event)
        if event.prompt_tokens is None or event.completion_tokens is None:
            if not wait:
                counting = asyncio.ensure_future(self._settle_counted(hold, event))
                self._counting.add(counting)
                counting.add_done_callback(self._counting.discard)
                return None
            event.usage_source = event.resolve_tokens()
        return self._settle(hold, event)

    async def _settle_counted(self, hold: Hold, event: UsageEvent) -> None:
        event.usage_source = await asyncio.to_thread(event.resolve_tokens)
        self._settle(hold, event)

    def _settle(self, hold: Hold, event: UsageEvent) -> SettleResult:
        used = settle(hold, prompt_tokens=event.prompt_tokens or 0,
                      completion_tokens=event.completion_tokens or 0)
        record: dict[str, Any] = {
            "request_id": event.request_id, "user_id": event.user_id,
            "api_key_id": event.api_key_id, "lease_id": hold.lease.id, "model": event.model,
            "upstream": event.upstream, "stream": event.stream,
            "prompt_tokens": event.prompt_tokens or 0,
            "completion_tokens": event.completion_tokens or 0,
            "usage_source": event.usage_source, "outcome": event.outcome,
            "status_code": event.status_code, "latency_ms": event.latency_ms,
            "created_at": utc_isoformat(event.created_at), "tokens_used": used.tokens_used,
            "uusd_used": used.uusd_used,
        }
        if hold.cap is not None:
            record["cap_lease_id"] = hold.cap.id
        assert self.spool is not None
        self.spool.append(record)  # durable against a crash of this process from here on
        self._pending.append(record)
        if len(self._pending) >= _FLUSH_RECORDS:
            self._flush_now.set()
        user_id = hold.lease.user_id
        unflushed = self._unflushed.setdefault(user_id, [0, 0])
        unflushed[0] += used.tokens_used
        unflushed[1] += used.uusd_used
        # The lease's view of the account, and the live lease's if a newer one took its place.
        live = self._leases.get(user_id)
        for lease in (hold.lease, live) if live is not hold.lease else (hold.lease,):
            if lease is not None and lease.unspent is not None:
                lease.unspent[0] -= used.tokens_used
                lease.unspent[1] -= used.uusd_used
        return SettleResult(used.cost_uusd, self._balance(hold.lease))

    @staticmethod
    def _period_over(lease: LiveLease) -> bool:
        return utcnow() >= lease.period_end

    # -- leases -----------------------------------------------------------------------------------

    async def _refill_or_recall(self, user_id: int, need_tokens: int, need_uusd: int,
                                fits: _Fits) -> LiveLease | None:
        """``_refill``; while the account cannot cover the request but other workers' leases
        hold some of its credit, recall that credit and try again, within ~300 ms. Runs under
        the account's lock: one recall per account and worker at a time, and the requests that
        queue behind a refusal are refused from memory (``exhausted_until``)."""
        for pause in _RECALL_PAUSES:
            lease, outcome = await self._refill(user_id, need_tokens, need_uusd, fits=fits)
            if (lease is None or outcome == "alone"
                    or (outcome == "took" and fits(lease.tokens_free, lease.uusd_free))):
                return lease
            # Recalled; or this worker heard a recall while the refill ran, and gave back the
            # free credit the refill counted on: it is in the account again, take it there.
            await asyncio.sleep(pause)
        lease, _ = await self._refill(user_id, need_tokens, need_uusd)
        return lease

    async def _cap_refill_or_recall(self, user_id: int, key_id: int, cap_uusd: int,
                                    need_uusd: int) -> CapLease:
        """``CapBook.refill``, recalling the key's headroom from other workers as
        ``_refill_or_recall`` does the account's credit."""
        for pause in _RECALL_PAUSES:
            cap, outcome = await self.caps.refill(user_id, key_id, cap_uusd, need_uusd,
                                                  recall=True, scarce=self._key_scarce(key_id))
            if outcome == "alone" or (outcome == "took" and cap.free >= need_uusd):
                return cap
            if outcome == "recalled":
                self._scarce_keys[key_id] = time.monotonic() + _SCARCE_SECONDS
            await asyncio.sleep(pause)
        cap, _ = await self.caps.refill(user_id, key_id, cap_uusd, need_uusd,
                                        scarce=self._key_scarce(key_id))
        return cap

    def _is_scarce(self, user_id: int) -> bool:
        return self._scarce.get(user_id, 0.0) > time.monotonic()

    def _key_scarce(self, key_id: int) -> bool:
        return self._scarce_keys.get(key_id, 0.0) > time.monotonic()

    async def _refill(self, user_id: int, need_tokens: int, need_uusd: int, *,
                      fits: _Fits | None = None) -> tuple[LiveLease | None, RefillOutcome]:
        """Take more of the account's credit into this worker's lease (one transaction); None
        when the account is in debt (then it is refused from memory for a second).

        With ``fits``: when what the lease would then hold does not fit the request and
        another worker's lease holds some of the account's credit, take nothing and recall it
        (notified on commit): ``"recalled"``, and the caller tries again. When no other worker
        holds any, the lease takes all there is: ``"alone"``.

        The lease returned is live. One retired while the transaction ran (gone idle, an epoch
        moved) may be closing already, its unused credit, this refill's with it, on the way
        back to the account: a request held against it would spend credit the account has
        again. Then the refill is done again, into a new lease."""
        while True:
            lease, outcome = await self._refill_once(user_id, need_tokens, need_uusd, fits=fits)
            if lease is None or not lease.retired:
                return lease, outcome

    async def _refill_once(self, user_id: int, need_tokens: int, need_uusd: int, *,
                           fits: _Fits | None) -> tuple[LiveLease | None, RefillOutcome]:
        now = utcnow()
        started = time.monotonic()
        ttl = self._catalog.reservation_ttl_seconds
        current = self._leases.get(user_id)
        if current is not None and started >= current.admits_until:
            # Its renewals are late: a sweep may close it at its deadline, returning what it
            # holds. It admits nothing more; a new lease takes its place.
            self._retire(current)
            current = None
        flushes = self._flushes_written
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            posting = service.Posting()
            state = (await service.current_accounts(repository, posting, [user_id],
                                                    self._catalog, now))[user_id]
            # A renewal waiting for leased balance to return: 503, retry in a second.
            service.require_current_period(state, now)
            if current is not None and (current.period_start != state.period_start
                                        or current.epoch != state.epoch):
                # The period renewed (that lease's included tokens belong to the ended period),
                # or the account changed in a way that retires leases of its older epoch.
                self._retire(current)
                current = None
            if state.debt_uusd > 0:
                await posting.write(repository, now)  # a renewal may have happened
                self._owes(user_id, state.debt_uusd)
                return None, "took"
            if self._is_scarce(user_id):
                # Only what the lease lacks: no fragment stays behind in it.
                take_tokens = min(state.tokens_available,
                                  max(0, need_tokens - (current.tokens_free if current else 0)))
                take_uusd = min(state.balance_uusd,
                                max(0, need_uusd - (current.uusd_free if current else 0)))
            else:
                take_tokens = min(state.tokens_available,
                                  max(need_tokens, state.tokens_available // _LEASE_SHARE))
                take_uusd = min(state.balance_uusd,
                                max(need_uusd, state.balance_uusd // _LEASE_SHARE))
            outcome: RefillOutcome = "took"
            if fits is not None:
                free_tokens = current.tokens_free if current is not None else 0
                free_uusd = current.uusd_free if current is not None else 0
                if not fits(free_tokens + take_tokens, free_uusd + take_uusd):
                    outcome = "alone"
                    if (repository.can_recall
                            and await repository.others_hold_credit(user_id, self._owner)):
                        # Leave what is there in the account: the recalled credit joins it,
                        # and whichever worker refills next finds it whole.
                        await repository.recall_leases(user_id)
                        self._scarce[user_id] = time.monotonic() + _SCARCE_SECONDS
                        take_tokens = take_uusd = 0
                        outcome = "recalled"
            lease_id = current.id if current is not None else 0
            grants = current.grants + 1 if current is not None else 1
            if take_tokens or take_uusd:
                if lease_id and not await repository.grow_lease(lease_id, take_tokens, take_uusd):
                    lease_id = 0  # closed under us (its deadline passed): start a new one
                if not lease_id:
                    lease_id = await repository.insert_lease(
                        user_id=user_id, owner=self._owner, tokens=take_tokens, uusd=take_uusd,
                        period_start=state.period_start,
                        expires_at=service.lease_deadline(now, ttl), now=now)
                    grants = 1
                service.lease_credit(posting, state, lease_ref=f"{lease_id}:{grants}",
                                     tokens=take_tokens, uusd=take_uusd, now=now)
            await posting.write(repository, now)
        # Committed: only now does the credit exist in memory.
        if current is None or current.id != lease_id:
            if current is not None:
                self._retire(current)
            # Another request's refill may have put a lease in place meanwhile (under another
            # lock object): it retires, never dropped unrenewed with its requests in flight.
            replaced = self._leases.get(user_id)
            if replaced is not None:
                self._retire(replaced)
            current = LiveLease(id=lease_id, user_id=user_id, period_start=state.period_start,
                                period_end=state.period_end, epoch=state.epoch, tokens_free=0,
                                uusd_free=0, account_tokens=0, account_uusd=0,
                                last_used=time.monotonic(),
                                admits_until=started + ttl * ADMIT_SHARE)
            self._leases[user_id] = current
        current.grants = grants
        current.tokens_free += take_tokens
        current.uusd_free += take_uusd
        current.account_tokens = state.tokens_available
        current.account_uusd = state.balance_uusd
        current.period_end = state.period_end
        self._saw(user_id, state.tokens_available + state.tokens_reserved,
                  state.balance_uusd + state.balance_reserved_uusd, flushes)
        return current, outcome

    def _saw(self, user_id: int, unspent_tokens: int, unspent_uusd: int, flushes: int) -> None:
        """Note on the account's live lease its unspent credit as just read from the database
        (by a read that started when ``_flushes_written`` was ``flushes``), which does not count
        yet what this worker has settled and not written. A retired lease keeps its last view: a
        request admitted on an old plan reports the old plan's credit."""
        lease = self._leases.get(user_id)
        if lease is None:
            return
        if self._flush_lock.locked() or flushes != self._flushes_written:
            # A flush may have committed and not yet struck its records off ``_unflushed``
            # (they would count twice), or committed after the read and struck them off since
            # (they would count not at all: the header would show credit already spent). Keep
            # the last view (none yet: the lease's own counters); the next read updates it.
            return
        unflushed = self._unflushed.get(user_id, (0, 0))
        lease.unspent = [unspent_tokens - unflushed[0], unspent_uusd - unflushed[1]]

    # -- pushed changes (``dubhe.pubsub``) ------------------------------------------------------

    def epoch_moved(self, payload: str) -> None:
        """An account's epoch moved (payload ``"<user id> <epoch>"``): retire a lease of an
        older one now, not at the next poll."""
        try:
            user_id, epoch = (int(part) for part in payload.split())
        except ValueError:
            log.warning("ignored an epoch notification %r", payload[:100])
            return
        lease = self._leases.get(user_id)
        if lease is not None and lease.epoch < epoch:
            self._retire(lease)

    def recalled(self, payload: str) -> None:
        """Another worker is short of an account's credit (payload ``"<user id>"``) or of a
        capped key's headroom (``"<user id> <key id>"``): give back what this worker's leases
        of it hold free, in the background."""
        try:
            ids = tuple(int(part) for part in payload.split())
        except ValueError:
            ids = ()
        if len(ids) not in (1, 2):
            log.warning("ignored a recall notification %r", payload[:100])
            return
        subject = (ids[0], ids[1] if len(ids) == 2 else None)
        user_id, key_id = subject
        until = time.monotonic() + _SCARCE_SECONDS
        if key_id is None:
            self._scarce[user_id] = until
            holds = any(lease.user_id == user_id and lease.id
                        and (lease.tokens_free or lease.uusd_free)
                        for lease in (*self._leases.values(), *self._retiring))
        else:
            self._scarce_keys[key_id] = until
            holds = self.caps.holds_free(key_id)
        # One give-back per subject at a time: the one running takes what is free when it
        # starts; credit freed later goes back at the short worker's next recall.
        if holds and subject not in self._giving_back:
            self._giving_back.add(subject)
            task = asyncio.ensure_future(self._give_back(user_id, key_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _give_back(self, user_id: int, key_id: int | None) -> None:
        """Return to the account the free part of this worker's leases of it (or, for a key,
        the free headroom of its cap leases: ``CapBook.give_back``), in one short transaction;
        what requests in flight hold stays in the lease. The lease stays open: this worker's
        next request for the account refills it as usual."""
        try:
            if key_id is not None:
                await self.caps.give_back(user_id, key_id)
                return
            taken = []
            for lease in (self._leases.get(user_id), *self._retiring):
                if (lease is not None and lease.user_id == user_id and lease.id
                        and (lease.tokens_free or lease.uusd_free)):
                    # Out of memory first: no request can be admitted against it from here on.
                    taken.append((lease, lease.tokens_free, lease.uusd_free))
                    lease.tokens_free = lease.uusd_free = 0
                    lease.recalls += 1
            if not taken:
                return
            now = utcnow()
            async with self._sessionmaker() as session, session.begin():
                repository = BillingRepository.from_session(session)
                posting = service.Posting()
                state = (await service.current_accounts(repository, posting, [user_id],
                                                        self._catalog, now))[user_id]
                for lease, tokens, uusd in taken:
                    period_start = await repository.shrink_lease(lease.id, tokens, uusd)
                    if period_start is not None:  # None: closed, its credit returned already
                        service.return_leased(
                            posting, state, ref=f"{lease.id}:recall:{lease.recalls}",
                            tokens=tokens, uusd=uusd, period_start=period_start, now=now,
                            description="unused lease credit recalled by another worker")
                await posting.write(repository, now)
        except Exception:
            # What was taken out of memory stays reserved in the lease (never spent twice) and
            # returns when the lease closes.
            log.warning("giving back the free credit of account %d's leases (key %s) failed; "
                        "it returns when they close", user_id, key_id, exc_info=True)
        finally:
            self._giving_back.discard((user_id, key_id))

    def _owes(self, user_id: int, debt_uusd: int) -> None:
        """Refuse the account from memory for a while: it owes ``debt_uusd``."""
        self._debtors[user_id] = (debt_uusd, time.monotonic() + _EXHAUSTED_SECONDS)
        lease = self._leases.get(user_id)
        if lease is not None:
            self._retire(lease)

    def _retire(self, lease: LiveLease) -> None:
        """No new admissions; closed once its requests have settled."""
        if not lease.retired:
            lease.retired = True
            self._retiring.append(lease)
        if self._leases.get(lease.user_id) is lease:
            del self._leases[lease.user_id]

    async def _close(self, lease_id: int, user_id: int, *, expired: bool = False) -> bool:
        """Return what a lease did not use to its account (settlements flushed first). With
        ``expired`` (a sweep), only if its deadline is still past: its worker may have renewed
        it since the sweep read it. Whether this call closed it."""
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            posting = service.Posting()
            states = await service.current_accounts(repository, posting, [user_id],
                                                    self._catalog, now)
            row = await repository.close_lease(lease_id, now, expired=expired)
            if row is not None:
                service.release_lease(posting, states[user_id], lease_id=lease_id,
                                      tokens=row.tokens - row.tokens_used,
                                      uusd=row.uusd - row.uusd_used,
                                      period_start=row.period_start, now=now)
            await posting.write(repository, now)
        return row is not None

    # -- flushing ---------------------------------------------------------------------------------

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            assert self.spool is not None
            records, self._pending = self._pending, []
            files = [*self._unflushed_files, self.spool.rotate()]
            applied = _Applied()
            # Bounded transactions: each chunk's Python work runs on the event loop, so a
            # backlog is written in slices that never stall requests for long.
            for start in range(0, len(records), _FLUSH_RECORDS):
                chunk = records[start : start + _FLUSH_RECORDS]
                try:
                    applied |= await self._write(chunk)
                except BaseException:
                    # The database is out of reach. Keep what is left: retried at the next flush
                    # (writes are idempotent by request id), and replayed from the spool after
                    # a crash.
                    self._pending = records[start:] + self._pending
                    self._unflushed_files = files
                    raise
                self._written(chunk)
            self._unflushed_files = []
            for path in files:
                path.unlink(missing_ok=True)
            self._learn(applied)

    def _written(self, records: list[dict[str, Any]]) -> None:
        """These settlements are in the database now (or set aside): the account reads count
        them from here on."""
        for record in records:
            unflushed = self._unflushed.get(record["user_id"])
            if unflushed is not None:
                unflushed[0] -= record["tokens_used"]
                unflushed[1] -= record["uusd_used"]
                if unflushed[0] <= 0 and unflushed[1] <= 0:
                    del self._unflushed[record["user_id"]]
        self._flushes_written += 1

    def _learn(self, applied: _Applied) -> None:
        for lease in list(self._leases.values()):
            if lease.id in applied.closed_leases:
                self._retire(lease)  # its deadline passed (heartbeats failed): stop using it
        for user_id, debt_uusd in applied.debts.items():
            self._owes(user_id, debt_uusd)  # this worker stops at once; the others by epoch

    async def _write(self, records: list[dict[str, Any]]) -> _Applied:
        """Write what the database will take; set aside, one by one, the records it refuses."""
        valid = []
        for record in records:
            problem = record_problem(record, self._catalog.models)
            if problem is None:
                valid.append(record)
            else:
                self._set_aside(record, problem)
        return await self._write_valid(valid)

    async def _write_valid(self, records: list[dict[str, Any]]) -> _Applied:
        if not records:
            return _Applied()
        try:
            return await self._apply(records)
        except _REFUSALS as exc:
            if len(records) == 1:
                self._set_aside(records[0], f"the database refused it: {exc!r}"[:2000])
                return _Applied()
        # Halve until the refused records are alone: log2(n) extra transactions per bad record.
        middle = len(records) // 2
        return await self._write_valid(records[:middle]) | await self._write_valid(records[middle:])

    def _set_aside(self, record: Any, reason: str) -> None:
        if self._dead_letter_file is None:
            self._dead_letter_file = DeadLetters(self._spool_dir, self._owner)
        self._dead_letter_file.append(record, reason)
        self.dead_letters += 1
        request_id = record.get("request_id") if isinstance(record, dict) else None
        log.error("usage record %r set aside in %s (%s); the other records are written",
                  request_id, self._dead_letter_file.path, reason)

    async def _apply(self, records: list[dict[str, Any]]) -> _Applied:
        """Write settled usage: one transaction, one ledger entry per request, once ever.
        Returns the leases it found closed and the accounts it left in debt."""
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            posting = service.Posting()
            states = await service.current_accounts(
                repository, posting, [record["user_id"] for record in records], self._catalog, now
            )
            done = await repository.existing_refs("settle", [r["request_id"] for r in records])
            statuses = await repository.lease_statuses(record["lease_id"] for record in records)
            lease_use: dict[int, list[int]] = defaultdict(lambda: [0, 0])
            cap_use: dict[int, int] = defaultdict(int)
            usage_rows = []
            last_used: dict[int, datetime] = {}
            for record in records:
                if record["request_id"] in done:
                    continue  # already written (a replay after a crash that followed a commit)
                done.add(record["request_id"])
                state = states[record["user_id"]]
                description = (f"{record['model']}: {record['prompt_tokens']} prompt + "
                               f"{record['completion_tokens']} completion tokens")
                # Its lease may have closed before this usage arrived (a worker that died with
                # it in its spool): what the lease paid went back to the account, so the account
                # pays it all now.
                from_lease = statuses.get(record["lease_id"]) == "open"
                lease_tokens = record["tokens_used"] if from_lease else 0
                lease_uusd = record["uusd_used"] if from_lease else 0
                settled = service.settle_usage(
                    posting, state, request_id=record["request_id"],
                    model=self._catalog.models[record["model"]],
                    prompt_tokens=record["prompt_tokens"],
                    completion_tokens=record["completion_tokens"], lease_tokens=lease_tokens,
                    lease_uusd=lease_uusd, description=description, now=now)
                if isinstance(record.get("cap_lease_id"), int):
                    cap_use[record["cap_lease_id"]] += settled.cost_uusd
                if from_lease:
                    use = lease_use[record["lease_id"]]
                    use[0] += lease_tokens
                    use[1] += lease_uusd
                created_at = datetime.fromisoformat(record["created_at"])
                usage_rows.append({
                    "request_id": record["request_id"], "user_id": record["user_id"],
                    "api_key_id": record["api_key_id"], "model": record["model"],
                    "upstream": record["upstream"], "stream": record["stream"],
                    "prompt_tokens": record["prompt_tokens"],
                    "completion_tokens": record["completion_tokens"],
                    "usage_source": record["usage_source"], "outcome": record["outcome"],
                    "status_code": record["status_code"], "latency_ms": record["latency_ms"],
                    "tokens_from_plan": settled.tokens_from_plan, "cost_uusd": settled.cost_uusd,
                    "uncollected_uusd": settled.debt_uusd, "created_at": created_at,
                })
                if record["api_key_id"] is not None:
                    last_used[record["api_key_id"]] = max(created_at, last_used.get(record["api_key_id"], created_at))
            await posting.write(repository, now)
            for lease_id, (tokens, uusd) in sorted(lease_use.items()):
                await repository.use_lease(lease_id, tokens, uusd)
            await repository.use_cap_leases(cap_use)
            await repository.insert_usage(usage_rows)
            await repository.touch_keys(last_used)
        return _Applied(
            closed_leases={lease_id for lease_id, status in statuses.items() if status != "open"},
            debts={user_id: state.debt_uusd for user_id, state in states.items()
                   if state.debt_uusd > 0},
        )

    # -- lifecycle and housekeeping ---------------------------------------------------------------

    @property
    def _owner(self) -> str:
        assert self.spool is not None
        return self.spool.owner

    def start(self) -> None:
        self.spool = Spool(self._spool_dir)
        self._stopping.clear()
        ttl = self._catalog.reservation_ttl_seconds
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="meter-flush"),
            asyncio.create_task(self._every(ttl / 3, self._heartbeat), name="meter-heartbeat"),
            asyncio.create_task(self._every(0.25, self._close_idle), name="meter-idle"),
            asyncio.create_task(self._every(max(0.5, ttl / 4), self.sweep), name="meter-sweep"),
            asyncio.create_task(self._every(_EPOCH_REFRESH_SECONDS, self._refresh_epochs),
                                name="meter-epochs"),
        ]
        self.caps.start(self._close_idle_caps)

    async def stop(self) -> None:
        """Flush what is spooled and return every lease's unused credit. The housekeeping
        loops end between two jobs, never cancelled inside one: a transaction cancelled
        mid-query leaves its connection holding its locks (SQLite's write lock, PostgreSQL's
        row locks on the accounts), and the last flush below would wait on them until the
        worker is killed, leaving its usage in the spool."""
        self._stopping.set()
        self._flush_now.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.caps.stop()
        await asyncio.gather(*self._counting, *self._background, return_exceptions=True)
        try:
            await self.flush()
            for lease in [*self._leases.values(), *self._retiring]:
                if lease.id:
                    await self._close(lease.id, lease.user_id)
            self._leases.clear()
            self._retiring.clear()
            caps = [cap for cap in self.caps.all() if cap.id]
            if caps:
                await self.caps.close(caps)
        finally:
            if self.spool is not None and not self._pending:
                self.spool.close()

    async def _every(self, seconds: float, job: Any) -> None:
        while not await self._stopped_within(seconds):
            try:
                await job()
            except Exception:
                log.exception("%s failed; retrying at the next interval", job.__name__)

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once if stop() was called."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _flush_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._flush_now.wait(), _FLUSH_SECONDS)
            except TimeoutError:
                pass
            self._flush_now.clear()
            if self._stopping.is_set():
                return  # stop() flushes, after every loop ended
            try:
                await self.flush()
            except Exception:
                log.exception("flushing usage to the database failed; it stays spooled")
                await self._stopped_within(1)

    async def _heartbeat(self) -> None:
        """Renew this worker's leases; one found closed (its deadline passed while renewals
        failed, and a sweep returned its unused credit) admits nothing more from here on."""
        leases = [lease for lease in (*self._leases.values(), *self._retiring) if lease.id]
        if not leases:
            return
        ttl = self._catalog.reservation_ttl_seconds
        started = time.monotonic()
        until = service.lease_deadline(utcnow(), ttl)
        async with self._sessionmaker() as session, session.begin():
            still_open = await BillingRepository.from_session(session).extend_leases(
                [lease.id for lease in leases], until)
        for lease in leases:
            if lease.id in still_open:
                lease.admits_until = started + ttl * ADMIT_SHARE
            else:
                self._retire(lease)

    async def _refresh_epochs(self) -> None:
        """Retire every lease whose account has moved to a newer epoch (a debt, a plan change),
        and note each account's unspent credit for the headers: one query for all the accounts
        this worker holds leases for. The fallback of ``epoch_moved``."""
        leases = list(self._leases.values())
        if not leases:
            return
        flushes = self._flushes_written
        async with self._read_sessionmaker() as session:
            positions = await BillingRepository.from_session(session).account_positions(
                lease.user_id for lease in leases)
        for lease in leases:
            position = positions.get(lease.user_id)
            if position is None or position.epoch > lease.epoch:
                self._retire(lease)
            if position is not None:
                self._saw(lease.user_id, position.unspent_tokens, position.unspent_uusd,
                          flushes)

    @contextlib.asynccontextmanager
    async def _account_lock(self, user_id: int) -> AsyncIterator[None]:
        """The account's lock, for a request admitted past memory (a refill): one at a time
        per account and worker."""
        self._lock_users[user_id] = self._lock_users.get(user_id, 0) + 1
        try:
            async with self._account_locks[user_id]:
                yield
        finally:
            users = self._lock_users.pop(user_id) - 1
            if users:
                self._lock_users[user_id] = users

    def _admitting(self, user_id: int) -> bool:
        """Whether a request of the account is being admitted past memory (a refill), or waits
        to be."""
        return user_id in self._lock_users

    async def _close_idle(self) -> None:
        idle_after = self._catalog.lease_idle_seconds
        moment = time.monotonic()
        for lease in list(self._leases.values()):
            # A lease of an ended period returns as soon as its requests settle: the renewal
            # waits for its balance. One whose account has a request being admitted (a refill
            # in its transaction) is not idle: closed under that request, the lease would
            # return to the account the credit the request is about to hold.
            if self._period_over(lease) or (lease.in_flight == 0
                                            and moment - lease.last_used > idle_after
                                            and not self._admitting(lease.user_id)):
                self._retire(lease)
        for user_id in [user for user, (_, until) in self._debtors.items() if until <= moment]:
            del self._debtors[user_id]
        for scarce in (self._scarce, self._scarce_keys):
            for subject in [subject for subject, until in scarce.items() if until <= moment]:
                del scarce[subject]
        drained = [lease for lease in self._retiring if lease.in_flight == 0]
        if not drained:
            return
        await self.flush()
        for lease in drained:
            if lease.id:
                await self._close(lease.id, lease.user_id)
            self._retiring.remove(lease)
            if lease.user_id not in self._leases and not self._admitting(lease.user_id):
                self._account_locks.pop(lease.user_id, None)  # idle accounts cost no memory

    async def _close_idle_caps(self) -> None:
        """Close the cap leases no request holds any more, once their settlements are written
        (closed, a lease counts only what it used: unflushed usage would be missed)."""
        drained = self.caps.drained(self._catalog.lease_idle_seconds, self._admitting)
        if drained:
            await self.flush()
            await self.caps.close(drained)

    async def sweep(self) -> None:
        """Replay the spools of dead workers on this machine, then return the unused credit of
        leases whose owner stopped renewing them."""
        assert self.spool is not None
        for lock, files in self.spool.orphans():
            for path in files:
                records = read_records(path)
                if records:
                    self._learn(await self._write(records))
                path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            log.warning("replayed the usage spool of a stopped worker (%s)", lock.name)
        async with self._sessionmaker() as session:
            expired = await BillingRepository.from_session(session).expired_leases(utcnow(), 100)
        for lease_id, user_id in expired:
            if await self._close(lease_id, user_id, expired=True):
                log.warning("returned the unused credit of lease %d (its worker stopped)",
                            lease_id)


@dataclass(slots=True)
class _Applied:
    """What writing a batch of settlements taught this worker about its leases and accounts."""

    closed_leases: set[int] = field(default_factory=set)
    debts: dict[int, int] = field(default_factory=dict)

    def __or__(self, other: _Applied) -> _Applied:
        return _Applied(self.closed_leases | other.closed_leases, {**self.debts, **other.debts})


# Whether a lease holding (tokens, µUSD) free would admit a request without a clamp.
_Fits = Callable[[int, int], bool]



def _fits(spec: ModelSpec, prompt_tokens: int, max_tokens: int, n: int) -> _Fits:
    def fits(tokens: int, uusd: int) -> bool:
        sized = size_admission(spec, prompt_tokens=prompt_tokens, max_tokens=max_tokens, n=n,
                               tokens_available=tokens, balance_uusd=uusd)
        return sized is not None and not sized.clamped
    return fits


def _covers(lease: LiveLease, spec: ModelSpec, prompt_tokens: int, max_tokens: int,
            n: int) -> bool:
    """Whether the lease alone pays for the request without a clamp."""
    sized = size_admission(spec, prompt_tokens=prompt_tokens, max_tokens=max_tokens, n=n,
                           tokens_available=lease.tokens_free, balance_uusd=lease.uusd_free)
    return sized is not None and not sized.clamped


def _distrust_bad_counts(event: UsageEvent) -> None:
    """A count that is not a non-negative integer of a possible size is not a count: drop it,
    so Dubhe counts what was exchanged instead (the record is then marked estimated). The
    upstream boundary should have done this already; the meter does not rely on it, because a
    bad count reaching the lease or the database poisons every later settlement of the worker."""
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(event, name)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT):
            log.warning("request %s: the upstream's %s %r is not a token count; counting instead",
                        event.request_id, name, value)
            setattr(event, name, None)
