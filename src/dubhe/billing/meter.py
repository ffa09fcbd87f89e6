"""The meter: reservations and settlements of every request, group-committed per worker.

Requests queue their reservation before the upstream call and their settlement after it; one
writer task takes everything queued and applies it in ONE short transaction: the accounts it
touches are locked in ascending order, every admission decision is made on the locked row, and
the net change per account is written back with one guarded update (``CHECK >= 0`` behind it).
A request waits for that commit, so a reservation is durable before the upstream is called and a
settlement (with its usage record) is durable before the client sees the end of its answer.

Why this design: exactness comes from the database alone (any number of workers and instances
share it), and the cost of a transaction is shared by every request that arrived while the last
one committed, so under load the per-request database cost shrinks instead of queueing.

Crash safety: a worker renews (heartbeats) the deadline of the reservations it holds; a sweeper in
every worker releases held reservations whose deadline passed, i.e. those of a crashed worker.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.billing import service
from dubhe.billing.pricing import Admission
from dubhe.billing.repository import BillingRepository
from dubhe.catalog import Catalog
from dubhe.usage.events import UsageEvent

log = logging.getLogger(__name__)

_MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's spendable position right after an operation, for response headers."""

    tokens_remaining: int
    balance_uusd: int


@dataclass(frozen=True, slots=True)
class Reserved:
    admission: Admission
    balance: Balance


@dataclass(frozen=True, slots=True)
class Denied:
    balance: Balance


@dataclass(frozen=True, slots=True)
class SettleResult:
    cost_uusd: int
    balance: Balance


@dataclass(slots=True)
class _Reserve:
    user_id: int
    request_id: str
    api_key_id: int | None
    model: str
    prompt_tokens: int
    max_tokens: int
    future: asyncio.Future[Reserved | Denied]


@dataclass(slots=True)
class _Settle:
    user_id: int
    event: UsageEvent
    future: asyncio.Future[SettleResult | None] | None


def _now() -> datetime:
    return datetime.now(UTC)


class Meter:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], catalog: Catalog) -> None:
        self._sessionmaker = sessionmaker
        self._catalog = catalog
        self._queue: list[_Reserve | _Settle] = []
        self._wakeup = asyncio.Event()
        self._in_flight: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- the hot path's interface -----------------------------------------------------------------

    def reserve(self, *, user_id: int, request_id: str, api_key_id: int | None, model: str,
                prompt_tokens: int, max_tokens: int) -> asyncio.Future[Reserved | Denied]:
        future: asyncio.Future[Reserved | Denied] = asyncio.get_running_loop().create_future()
        self._queue.append(_Reserve(user_id, request_id, api_key_id, model, prompt_tokens,
                                    max_tokens, future))
        self._wakeup.set()
        return future

    def settle(self, event: UsageEvent, *, wait: bool) -> asyncio.Future[SettleResult | None] | None:
        """Queue the settlement; with ``wait`` the future resolves once it is committed. Without,
        it is written all the same (a cancelled request has nobody left to wait)."""
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append(_Settle(event.user_id, event, future))
        self._wakeup.set()
        return future

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        ttl = self._catalog.reservation_ttl_seconds
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="meter-writer"),
            asyncio.create_task(self._every(ttl / 3, self._heartbeat), name="meter-heartbeat"),
            asyncio.create_task(self._every(max(0.5, ttl / 4), self.sweep), name="meter-sweeper"),
        ]

    async def stop(self) -> None:
        """Write everything still queued, then stop."""
        self._closing = True
        self._wakeup.set()
        writer, *periodic = self._tasks
        for task in periodic:
            task.cancel()
        await asyncio.gather(*periodic, return_exceptions=True)
        await writer

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("%s failed; retrying at the next interval", job.__name__)

    # -- the writer -----------------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[_Reserve | _Settle]) -> None:
        try:
            results = await self._apply(batch)
        except Exception:
            log.exception("a billing batch of %d failed; applying one by one", len(batch))
            for operation in batch:
                await self._write_alone(operation)
            return
        for operation, result in zip(batch, results):
            if operation.future is not None and not operation.future.done():
                operation.future.set_result(result)  # type: ignore[arg-type]

    async def _write_alone(self, operation: _Reserve | _Settle) -> None:
        attempts = 1 if isinstance(operation, _Reserve) else 5
        for attempt in range(1, attempts + 1):
            try:
                [result] = await self._apply([operation])
            except Exception as exc:
                if attempt == attempts:
                    log.exception("billing operation for %s failed", _request_id(operation))
                    if operation.future is not None and not operation.future.done():
                        operation.future.set_exception(exc)
                    return
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            if operation.future is not None and not operation.future.done():
                operation.future.set_result(result)  # type: ignore[arg-type]
            return

    async def _apply(self, batch: list[_Reserve | _Settle]) -> list[Any]:
        now = _now()
        catalog = self._catalog
        # Usage the upstream did not report is counted before the transaction opens.
        for operation in batch:
            event = operation.event if isinstance(operation, _Settle) else None
            if event is not None and (event.prompt_tokens is None or event.completion_tokens is None):
                event.usage_source = event.resolve_tokens()
        results: list[Any] = []
        reservations: list[dict[str, Any]] = []
        usage: list[dict[str, Any]] = []
        last_used: dict[int, datetime] = {}
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            posting = service.Posting()
            # Reservations first, then accounts: the same lock order as the sweeper.
            claimed = await repository.claim_reservations(
                [op.event.request_id for op in batch if isinstance(op, _Settle)], "settled", now
            )
            states = await service.current_accounts(
                repository, posting, [op.user_id for op in batch], catalog, now
            )
            for operation in batch:
                state = states[operation.user_id]
                if isinstance(operation, _Reserve):
                    model = catalog.models[operation.model]
                    admission = service.reserve(
                        posting, state, request_id=operation.request_id, model=model,
                        prompt_tokens=operation.prompt_tokens, max_tokens=operation.max_tokens,
                        now=now,
                    )
                    balance = Balance(state.tokens_available, state.balance_uusd)
                    if admission is None:
                        results.append(Denied(balance))
                        continue
                    reservations.append({
                        "request_id": operation.request_id, "user_id": operation.user_id,
                        "api_key_id": operation.api_key_id, "model": operation.model,
                        "tokens": admission.tokens, "balance_uusd": admission.balance_uusd,
                        "prompt_tokens": operation.prompt_tokens,
                        "max_tokens": admission.max_tokens, "period_start": state.period_start,
                        "status": "held", "created_at": now,
                        "expires_at": service.reservation_deadline(now, catalog.reservation_ttl_seconds),
                    })
                    results.append(Reserved(admission, balance))
                    continue
                event = operation.event
                held = claimed.pop(event.request_id, None)
                if held is None:
                    log.warning("settlement of %s skipped: its reservation is not held", event.request_id)
                    results.append(None)
                    continue
                settled = service.settle(
                    posting, state, request_id=event.request_id, model=catalog.models[event.model],
                    reserved_tokens=held.tokens, reserved_uusd=held.balance_uusd,
                    reserved_period=held.period_start, prompt_tokens=event.prompt_tokens or 0,
                    completion_tokens=event.completion_tokens or 0, now=now,
                )
                usage.append(_usage_row(event, settled))
                if event.api_key_id is not None:
                    last_used[event.api_key_id] = now
                results.append(SettleResult(settled.cost_uusd,
                                            Balance(state.tokens_available, state.balance_uusd)))
            await posting.write(repository, now)
            await repository.insert_reservations(reservations)
            await repository.insert_usage(usage)
            await repository.touch_keys(last_used)
        for operation, result in zip(batch, results):
            if isinstance(result, Reserved):
                self._in_flight.add(operation.request_id)  # type: ignore[union-attr]
            elif isinstance(operation, _Settle):
                self._in_flight.discard(operation.event.request_id)
        return results

    # -- crash safety ---------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Push the deadline of this worker's held reservations forward."""
        ids = list(self._in_flight)
        if not ids:
            return
        until = service.reservation_deadline(_now(), self._catalog.reservation_ttl_seconds)
        async with self._sessionmaker() as session, session.begin():
            repository = BillingRepository.from_session(session)
            for start in range(0, len(ids), 500):
                await repository.extend_reservations(ids[start : start + 500], until)

    async def sweep(self) -> int:
        """Release reservations past their deadline (their worker died); returns how many."""
        async with self._sessionmaker() as session:
            expired = await BillingRepository.from_session(session).expired_reservation_ids(_now(), 200)
        released = 0
        for request_id in expired:
            now = _now()
            async with self._sessionmaker() as session, session.begin():
                repository = BillingRepository.from_session(session)
                claimed = await repository.claim_reservations([request_id], "expired", now)
                held = claimed.get(request_id)
                if held is None:
                    continue  # settled or swept by someone else meanwhile
                posting = service.Posting()
                states = await service.current_accounts(repository, posting, [held.user_id],
                                                        self._catalog, now)
                model = self._catalog.models.get(held.model)
                if model is None:
                    continue
                settled = service.settle(
                    posting, states[held.user_id], request_id=request_id, model=model,
                    reserved_tokens=held.tokens, reserved_uusd=held.balance_uusd,
                    reserved_period=held.period_start, prompt_tokens=0, completion_tokens=0,
                    now=now,
                )
                await posting.write(repository, now)
                event = UsageEvent(
                    request_id=request_id, user_id=held.user_id, api_key_id=held.api_key_id,
                    model=held.model, upstream=None, stream=False, outcome="abandoned",
                    status_code=0, latency_ms=0, created_at=now, prompt_tokens=0,
                    completion_tokens=0,
                )
                event.usage_source = "estimated"
                await repository.insert_usage([_usage_row(event, settled)])
            released += 1
        if released:
            log.warning("released %d reservations abandoned by a stopped worker", released)
        return released


def _usage_row(event: UsageEvent, settled: service.Settled) -> dict[str, Any]:
    return {
        "request_id": event.request_id, "user_id": event.user_id, "api_key_id": event.api_key_id,
        "model": event.model, "upstream": event.upstream, "stream": event.stream,
        "prompt_tokens": event.prompt_tokens or 0, "completion_tokens": event.completion_tokens or 0,
        "usage_source": event.usage_source, "outcome": event.outcome,
        "status_code": event.status_code, "latency_ms": event.latency_ms,
        "tokens_from_plan": settled.tokens_from_plan, "cost_uusd": settled.cost_uusd,
        "uncollected_uusd": settled.uncollected_uusd, "created_at": event.created_at,
    }


def _request_id(operation: _Reserve | _Settle) -> str:
    return operation.request_id if isinstance(operation, _Reserve) else operation.event.request_id
