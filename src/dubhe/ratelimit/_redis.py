"""Plan limits shared by every worker and instance through Redis, leased in slices.

A Redis round trip costs ~110-265 µs of Python CPU here, so a request does not make one each:

- **Rates** (requests and tokens per minute) are one GCRA TAT per subject in Redis. A worker
  takes a *slice* of units at once (a Lua script grants what the minute allows, atomically) and
  spends it locally; a slice unused for ``LEASE_SECONDS`` is given back (the TAT moves back).
  Every unit spent was granted by Redis first, so the limit is never exceeded across workers:
  the bound is the limit itself (plus what the minute refills). What slices cost is the other
  way: units leased by one worker and idle there are not available to another for up to
  ``LEASE_SECONDS``. A slice is 1/60 of the per-minute limit (at least 1): at most ~60 round
  trips a minute per subject and worker, however fast the requests come.
- A refusal is remembered until its retry time: a flood of refused requests costs no round trip.
- **Concurrency** is a hash per subject, one field per worker holding its slot count (with an
  expiry, refreshed while held, so a dead worker's slots free themselves). A worker asks for one
  more slot only when all it holds are busy; a slot freed is kept for ``IDLE_RELEASE_SECONDS``
  for the next request before it is handed back. A worker refused a slot while other workers
  hold some *recalls* them (Redis pub/sub): each hands its idle slots back at once, and the
  refused request asks again, within ``RECALL_WAITS`` (~70 ms), before it gets 429. So a key
  whose requests all ended can be used again at once, on any worker; only slots really in use
  refuse. One recall per subject and worker at a time: a refused flood costs no extra trips.

When Redis cannot be reached: fail open (the default) answers from this worker's own exact
limits (``LocalBudget``) until Redis answers again, or fail closed refuses with 503. Either way
a warning is logged once per outage and ``redis_failures`` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dubhe.ratelimit._local import LocalBudget, standing
from dubhe.ratelimit._plan import BudgetUnavailable, Limits, Refusal, Standing

log = logging.getLogger(__name__)

LEASE_SECONDS = 1.0
IDLE_RELEASE_SECONDS = 0.3
# A worker's slots expire this long after its last refresh (a crashed worker's come back).
SLOT_TTL_SECONDS = 10.0
_FLUSH_INTERVAL = 0.1
_RETRY_AFTER_FAILURE = 1.0
# A refused concurrency slot is not asked for again this soon (slots free at any moment).
_CONCURRENCY_BACKOFF = 0.05
# After a recall, a refused request asks for its slot again after each of these pauses.
RECALL_WAITS = (0.02, 0.05)

_GRANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 60000000 / tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + 60000000 - tat) / interval + 0.000001)
if room < need then
  return {0, math.ceil(tat + need * interval - now - 60000000), math.ceil(tat - now)}
end
local grant = math.min(want, room)
tat = tat + grant * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {grant, 0, math.ceil(tat - now)}
"""

_GIVE_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat <= now then return 0 end
tat = math.max(tat - tonumber(ARGV[2]) * 60000000 / tonumber(ARGV[1]), now)
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 1
"""

_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local me = ARGV[1]
local held = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local mine = tonumber(redis.call('HGET', KEYS[1], me) or '0')
if held > mine then
  local total = 0
  local expiries = redis.call('HGETALL', KEYS[2])
  for i = 1, #expiries, 2 do
    local worker = expiries[i]
    if worker ~= me then
      if tonumber(expiries[i + 1]) < now then
        redis.call('HDEL', KEYS[1], worker)
        redis.call('HDEL', KEYS[2], worker)
      else
        total = total + tonumber(redis.call('HGET', KEYS[1], worker) or '0')
      end
    end
  end
  if total + held > limit then return 0 end
end
if held == 0 then
  redis.call('HDEL', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
else
  redis.call('HSET', KEYS[1], me, held)
  redis.call('HSET', KEYS[2], me, string.format('%.0f', now + ttl))
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
  redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000))
end
return 1
"""


@dataclass(slots=True)
class _Slice:
    """Units of one rate leased from Redis and not yet spent."""

    units: int = 0
    leased_at: float = 0.0
    used_at_grant: float = 0.0  # the global TAT minus now, in seconds, at the last grant
    per_minute: int = 0
    blocked_until: float = 0.0
    blocked_need: int = 0

    def fresh(self, now: float) -> bool:
        return now - self.leased_at < LEASE_SECONDS

    def standing(self, per_minute: int, now: float) -> Standing:
        used = max(self.used_at_grant - (now - self.leased_at), 0.0)
        base = standing(per_minute, now + used, now)
        unspent = self.units if self.fresh(now) else 0
        return Standing(per_minute, min(base.remaining + unspent, per_minute), used)


@dataclass(slots=True)
class _Subject:
    requests: _Slice = field(default_factory=_Slice)
    tokens: _Slice = field(default_factory=_Slice)
    in_flight: int = 0
    held: int = 0
    fallback_in_flight: int = 0
    idle_since: float = 0.0
    refreshed_at: float = 0.0
    slots_blocked_until: float = 0.0
    # A request of this worker has recalled the subject's idle slots and is asking again.
    recalling: bool = False
    # Requests awaiting Redis for this subject: while any are, the flusher must not forget it
    # (they would count their slots on an object no longer in the map).
    waiting: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RedisBudget:
    def __init__(self, client: Redis, *, prefix: str, fail_open: bool = True) -> None:
        self._client = client
        self._prefix = prefix
        self.fail_open = fail_open
        self._fallback = LocalBudget()
        self._subjects: dict[str, _Subject] = {}
        self._worker = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._grant = client.register_script(_GRANT)
        self._give_back = client.register_script(_GIVE_BACK)
        self._hold = client.register_script(_HOLD)
        self._down_until = 0.0
        self.redis_failures = 0
        self.on_failure: list[Callable[[], None]] = []
        self.round_trips = 0
        self.recalls = 0
        self._recall_channel = f"{prefix}rl:recall"
        # Other channels this worker listens on (``subscribe``), by their full names.
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._publishing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    @property
    def worker(self) -> str:
        return self._worker

    # -- pub/sub for others (the routing's shared breakers) ------------------------------------

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call ``handler`` with each message on ``channel`` (before ``start``)."""
        self._handlers[f"{self._prefix}{channel}"] = handler

    def publish_soon(self, channel: str, payload: str) -> None:
        """Publish without waiting: a lost message costs only what each worker learns alone."""
        task = asyncio.get_running_loop().create_task(self._publish(channel, payload))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, channel: str, payload: str) -> None:
        try:
            await self._client.publish(f"{self._prefix}{channel}", payload)
        except (RedisError, OSError) as error:
            self._failed(error)

    # -- the shared budget, or what replaces it while Redis is down ----------------------------

    def _key(self, subject: str, kind: str) -> str:
        return f"{self._prefix}rl:{{{subject}}}:{kind}"

    def _subject(self, subject: str) -> _Subject:
        state = self._subjects.get(subject)
        if state is None:
            state = self._subjects[subject] = _Subject()
        return state

    def _down(self, now: float) -> bool:
        return now < self._down_until

    def _failed(self, error: BaseException) -> None:
        self.redis_failures += 1
        for hook in self.on_failure:
            hook()
        if not self._down(time.monotonic()):
            log.warning("Redis is unreachable (%s): rate limits %s", type(error).__name__,
                        "fall back to each worker's own counts" if self.fail_open
                        else "refuse requests (fail closed)")
        self._down_until = time.monotonic() + _RETRY_AFTER_FAILURE

    # -- rates -------------------------------------------------------------------------------

    async def _take(self, subject: str, kind: str, per_minute: int, cost: int,
                    chunk: int) -> Refusal | Standing | None:
        """Spend ``cost`` units of a rate: from the slice when it covers them, else one grant
        from Redis. ``None`` when Redis is down (the caller falls back)."""
        state = self._subject(subject)
        rate = state.requests if kind == "r" else state.tokens
        now = time.monotonic()
        if rate.per_minute != per_minute:
            rate.units, rate.per_minute = 0, per_minute  # a changed limit: lease anew
        if rate.units >= cost and rate.fresh(now):
            rate.units -= cost
            return rate.standing(per_minute, now)
        if now < rate.blocked_until and cost >= rate.blocked_need:
            return Refusal(rate.blocked_until - now)
        if self._down(now):
            return None
        have = rate.units if rate.fresh(now) else 0
        need = cost - have
        state.waiting += 1
        try:
            self.round_trips += 1
            granted, wait_us, used_us = await self._grant(
                keys=[self._key(subject, kind)], args=[per_minute, need + chunk, need])
        except (RedisError, OSError) as error:
            self._failed(error)
            return None
        finally:
            state.waiting -= 1
        now = time.monotonic()
        if granted == 0:
            rate.blocked_until = now + wait_us / 1e6
            rate.blocked_need = need
            return Refusal(wait_us / 1e6)
        # Units of a stale slice were given back (or will be, by the flusher); keep what is ours.
        rate.units = (rate.units if rate.fresh(now) else 0) + int(granted) - cost
        rate.leased_at = now
        rate.used_at_grant = used_us / 1e6
        rate.blocked_until = 0.0
        return rate.standing(per_minute, now)

    async def take_requests(self, subject: str, limits: Limits) -> Refusal | Standing:
        per_minute = limits.requests_per_minute
        verdict = await self._take(subject, "r", per_minute, 1, max(per_minute // 60, 1) - 1)
        if verdict is None:
            if not self.fail_open:
                raise BudgetUnavailable
            return await self._fallback.take_requests(subject, limits)
        return verdict

    async def take_tokens(self, subject: str, limits: Limits, tokens: int) -> Refusal | Standing:
        per_minute = limits.tokens_per_minute
        verdict = await self._take(subject, "t", per_minute, tokens, per_minute // 60)
        if verdict is None:
            if not self.fail_open:
                raise BudgetUnavailable
            return await self._fallback.take_tokens(subject, limits, tokens)
        return verdict

    def return_tokens(self, subject: str, limits: Limits, tokens: int) -> None:
        state = self._subjects.get(subject)
        if state is None or state.tokens.per_minute != limits.tokens_per_minute:
            return
        # Back into the slice: spent by the next request here, or given back within a second.
        if state.tokens.fresh(time.monotonic()):
            state.tokens.units += tokens
        else:
            state.tokens.units = tokens
            state.tokens.leased_at = time.monotonic()

    def tokens_standing(self, subject: str, limits: Limits) -> Standing:
        state = self._subjects.get(subject)
        now = time.monotonic()
        if state is None or state.tokens.per_minute != limits.tokens_per_minute:
            return Standing(limits.tokens_per_minute, limits.tokens_per_minute, 0.0)
        return state.tokens.standing(limits.tokens_per_minute, now)

    def requests_standing(self, subject: str, limits: Limits) -> Standing:
        state = self._subjects.get(subject)
        now = time.monotonic()
        if state is None or state.requests.per_minute != limits.requests_per_minute:
            return Standing(limits.requests_per_minute, limits.requests_per_minute, 0.0)
        return state.requests.standing(limits.requests_per_minute, now)

    # -- concurrency ---------------------------------------------------------------------------

    async def enter(self, subject: str, limits: Limits) -> bool:
        state = self._subject(subject)
        if state.in_flight >= limits.concurrent:
            return False
        if state.in_flight < state.held:
            state.in_flight += 1
            return True
        now = time.monotonic()
        if now < state.slots_blocked_until:
            return False
        if self._down(now):
            return await self._enter_fallback(state, subject, limits)
        state.waiting += 1
        try:
            return await self._enter_slowly(state, subject, limits)
        finally:
            state.waiting -= 1

    async def _enter_slowly(self, state: _Subject, subject: str, limits: Limits) -> bool:
        granted = await self._ask_slot(state, subject, limits)
        if granted is not None:
            return granted
        if state.recalling:  # another request of this worker is already recalling
            return False
        state.recalling = True
        try:
            return await self._recall(state, subject, limits)
        finally:
            state.recalling = False

    async def _ask_slot(self, state: _Subject, subject: str, limits: Limits) -> bool | None:
        """One more slot from Redis: ``None`` when Redis refused it (every slot is held)."""
        async with state.lock:
            if state.in_flight < state.held:  # freed or granted while this one waited
                state.in_flight += 1
                return True
            try:
                self.round_trips += 1
                granted = await self._hold(
                    keys=[self._key(subject, "c"), self._key(subject, "ce")],
                    args=[self._worker, state.in_flight + 1, limits.concurrent,
                          int(SLOT_TTL_SECONDS * 1e6)])
            except (RedisError, OSError) as error:
                self._failed(error)
                return await self._enter_fallback(state, subject, limits)
            if not granted:
                state.slots_blocked_until = time.monotonic() + _CONCURRENCY_BACKOFF
                return None
            state.held = state.in_flight + 1
            state.in_flight += 1
            state.refreshed_at = time.monotonic()
            state.slots_blocked_until = 0.0
            return True

    async def _recall(self, state: _Subject, subject: str, limits: Limits) -> bool:
        """Ask every worker to hand back the subject's idle slots, then ask for one again."""
        try:
            listeners = await self._client.publish(self._recall_channel, subject)
        except (RedisError, OSError) as error:
            self._failed(error)
            return False
        self.recalls += 1
        if listeners <= 1:  # only this worker listens: nobody else can give a slot back
            return False
        for pause in RECALL_WAITS:
            await asyncio.sleep(pause)
            granted = await self._ask_slot(state, subject, limits)
            if granted is not None:
                return granted
        return False

    async def _enter_fallback(self, state: _Subject, subject: str, limits: Limits) -> bool:
        if not self.fail_open:
            raise BudgetUnavailable
        if await self._fallback.enter(subject, limits):
            state.fallback_in_flight += 1
            return True
        return False

    def leave(self, subject: str) -> None:
        state = self._subjects.get(subject)
        if state is None:
            return
        if state.fallback_in_flight:
            state.fallback_in_flight -= 1
            self._fallback.leave(subject)
            return
        if state.in_flight > 0:
            state.in_flight -= 1
            state.idle_since = time.monotonic()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    # -- background: give back idle slices and slots, keep held slots alive ---------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="ratelimit-flush")
        self._listener = asyncio.create_task(self._answer_recalls(), name="ratelimit-recalls")

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            await self.flush(everything=True)
        except (RedisError, OSError):
            pass
        await self._client.aclose()

    async def _release_idle(self, subject: str, state: _Subject) -> None:
        async with state.lock:
            # Lower the local count first: ``enter`` takes a spare slot without the lock, and
            # must never use one that Redis is being told is free.
            target = state.held = state.in_flight
            await self._hold(keys=[self._key(subject, "c"), self._key(subject, "ce")],
                             args=[self._worker, target, 0, int(SLOT_TTL_SECONDS * 1e6)])
            state.refreshed_at = time.monotonic()

    async def _answer_recalls(self) -> None:
        """Hand back a subject's idle slots as soon as another worker recalls them (and pass
        other channels' messages to their handlers)."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._recall_channel, *self._handlers)
                while True:
                    message = await pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    channel = message["channel"].decode()
                    if channel != self._recall_channel:
                        handler = self._handlers.get(channel)
                        if handler is not None:
                            handler(message["data"].decode(errors="replace"))
                        continue
                    subject = message["data"].decode()
                    state = self._subjects.get(subject)
                    if state is not None and state.held > state.in_flight:
                        await self._release_idle(subject, state)
            except (RedisError, OSError) as error:
                self._failed(error)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_RETRY_AFTER_FAILURE)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL)
            if self._down(time.monotonic()):
                continue
            try:
                await self.flush()
            except (RedisError, OSError) as error:
                self._failed(error)

    async def flush(self, *, everything: bool = False) -> None:
        now = time.monotonic()
        for subject, state in list(self._subjects.items()):
            for kind, rate in (("r", state.requests), ("t", state.tokens)):
                if rate.units > 0 and (everything or not rate.fresh(now)):
                    units, rate.units = rate.units, 0
                    await self._give_back(keys=[self._key(subject, kind)],
                                          args=[rate.per_minute, units])
            if state.held > state.in_flight and (
                everything or now - state.idle_since >= IDLE_RELEASE_SECONDS
            ):
                await self._release_idle(subject, state)
            elif state.held and now - state.refreshed_at >= SLOT_TTL_SECONDS / 3:
                async with state.lock:
                    await self._hold(keys=[self._key(subject, "c"), self._key(subject, "ce")],
                                     args=[self._worker, state.held, 1 << 30,
                                           int(SLOT_TTL_SECONDS * 1e6)])
                    state.refreshed_at = now
            if not state.held and not state.in_flight and not state.fallback_in_flight and (
                not state.waiting and not state.lock.locked() and
                not state.requests.fresh(now) and not state.tokens.fresh(now)
                and now > state.requests.blocked_until and now > state.tokens.blocked_until
            ):
                del self._subjects[subject]


def redis_client(url: str) -> Redis:
    # Short timeouts: a hung Redis must cost a request a fraction of a second, once per outage.
    return Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=0.5,
                          health_check_interval=0)
