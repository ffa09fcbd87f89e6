"""The hot path's view of API keys: a per-worker map from key HMAC to who is calling.

A warm key costs one BLAKE2b of its Authorization header and two dict lookups (the HMAC stored
in the database, ~4 µs, is computed once per header a worker sees succeed). Every second a
refresh reads the keys and users changed since the last refresh, so a revocation or a plan
change made on any instance reaches every worker within about a second without a query per
request.

Unknown keys cost no query either: the worker holds a filter of every key hash in the database
(loaded at start, extended by each refresh). A key whose hash is in the filter but not yet in the
map (its first use on this worker) is read once. A key whose hash is not in it is either made up
or created in the last second: it waits for the next refresh, which starts early on demand but
at most every ``_MIN_REFRESH_INTERVAL`` seconds, so a flood of guessed keys shares a few queries a
second however fast it comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from hashlib import blake2b

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.errors import AuthenticationFailed
from dubhe.keys.format import hash_key, is_well_formed
from dubhe.keys.repository import ApiKeyRepository
from dubhe.models import ApiKey
from dubhe.models.base import utcnow

log = logging.getLogger(__name__)

# Re-read this much of the past on every refresh. A change is stamped (``updated_at``) when its
# transaction writes it, not when it commits, and a transaction waiting for a lock (SQLite's one
# writer on a loaded machine) can commit many seconds after its stamp; clocks of instances drift
# too. With 5 s a revocation that committed late was missed for good. Re-reading a minute costs
# one indexed query returning the few keys changed in it.
_REFRESH_OVERLAP = timedelta(seconds=60)
_NEGATIVE_CACHE_LIMIT = 100_000
# Authorization headers that authenticated, remembered by a keyed BLAKE2b of them (never the
# header itself) with their key's HMAC; forgotten all at once past this many.
_WARM_LIMIT = 10_000
_MIN_REFRESH_INTERVAL = 0.05
# How long a request with a key the filter does not know waits for a refresh before it is
# refused (only reached when the database is slow or down).
_UNKNOWN_KEY_WAIT = 5.0


def _fingerprint(key_hash: str) -> int:
    """64 bits of the HMAC: a compact filter entry; a collision only costs one query."""
    return int(key_hash[:16], 16)


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    key_id: int
    user_id: int
    plan_code: str
    expires_at: float | None  # epoch seconds
    revoked: bool
    # The key's monthly spend cap in µUSD (``billing/caps.py``); None: uncapped.
    spend_cap_uusd: int | None = None
    # The key's own rate limits (NULL columns: the plan's); see ``ratelimit/_plan.py``.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    concurrency_limit: int | None = None
    key_prefix: str = ""  # what lists and logs show (sk-dubhe-AbCd…), never the key


def _identity(key: ApiKey, plan_code: str, *, owner_disabled: bool) -> KeyIdentity:
    # A disabled account's keys are refused like revoked ones, and work again when an admin
    # enables it (the change moves ``users.updated_at``, which the refresh watches).
    return KeyIdentity(
        key_id=key.id,
        user_id=key.user_id,
        plan_code=plan_code,
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        revoked=key.revoked_at is not None or owner_disabled,
        spend_cap_uusd=key.spend_cap_uusd,
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        concurrency_limit=key.concurrency_limit,
        key_prefix=key.prefix,
    )


class KeyCache:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        secret: bytes,
        *,
        refresh_seconds: float = 1.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._secret = secret
        self._refresh_seconds = refresh_seconds
        self._by_hash: dict[str, KeyIdentity] = {}
        self._warm: dict[bytes, str] = {}
        self._warm_key = os.urandom(32)  # this worker's own: a tag means nothing elsewhere
        self._unknown: set[str] = set()
        self._loading: dict[str, asyncio.Future[KeyIdentity]] = {}
        self._known: set[int] = set()
        self._watermark = utcnow()
        # Counts changes to identities already cached (a revocation, a plan change): a holder of
        # a long-lived authentication (an open WebSocket) re-checks its key only when it moved.
        self.revision = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Resolved by the next refresh to *start*: a key created before a request arrived is seen
        # by a refresh that starts after it.
        self._next_refresh: asyncio.Future[None] | None = None

    async def authenticate(self, authorization: bytes | None) -> KeyIdentity:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header as "
                "'Authorization: Bearer sk-dubhe-...'; create one in the dashboard.",
                code="missing_api_key",
            )
        tag = blake2b(authorization, key=self._warm_key, digest_size=16).digest()
        warm = self._warm.get(tag)
        if warm is not None and (identity := self._by_hash.get(warm)) is not None:
            return _usable(identity)
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed(
                "The Authorization header must be 'Bearer <your API key>'.", code="invalid_api_key"
            )
        key_hash = hash_key(self._secret, token)
        identity = self._by_hash.get(key_hash)
        if identity is None:
            # Only a key this worker has not seen is checked for form: a made-up one is refused
            # before any set lookup or query (a key in the cache was well formed when issued).
            if not is_well_formed(token):
                raise _invalid_key()
            if key_hash in self._unknown:
                raise _invalid_key()
            if _fingerprint(key_hash) not in self._known:
                await self._refreshed()
                if _fingerprint(key_hash) not in self._known:
                    raise _invalid_key()
            identity = await self._load_once(key_hash)
        _usable(identity)
        if len(self._warm) >= _WARM_LIMIT:
            self._warm.clear()
        self._warm[tag] = key_hash
        return identity

    async def _load_once(self, key_hash: str) -> KeyIdentity:
        """``_load``, shared by every request that waits for the same key: a burst of requests
        with a key new to this worker makes one query, not one connection each (50 at once
        exhausted the database's connections)."""
        loading = self._loading.get(key_hash)
        if loading is None:
            loading = self._loading[key_hash] = asyncio.ensure_future(self._load(key_hash))
            loading.add_done_callback(lambda done: self._loaded(key_hash, done))
        return await asyncio.shield(loading)

    def _loaded(self, key_hash: str, done: asyncio.Future[KeyIdentity]) -> None:
        self._loading.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone (cancelled) by now

    async def _load(self, key_hash: str) -> KeyIdentity:
        async with self._sessionmaker() as session:
            row = await ApiKeyRepository.from_session(session).identity_by_hash(key_hash)
        if row is None:
            if len(self._unknown) >= _NEGATIVE_CACHE_LIMIT:
                self._unknown.clear()
            self._unknown.add(key_hash)
            raise _invalid_key()
        identity = _identity(row[0], row[1], owner_disabled=row[2] is not None)
        self._by_hash[key_hash] = identity
        return identity

    async def load(self) -> None:
        """Fill the filter with every key hash in the database (once, at start)."""
        started = utcnow()
        async with self._sessionmaker() as session:
            hashes = await ApiKeyRepository.from_session(session).all_hashes()
        self._known = {_fingerprint(key_hash) for key_hash in hashes}
        self._watermark = started

    async def refresh(self) -> None:
        """Apply the key and user changes made since the last refresh (on any instance)."""
        started = utcnow()
        async with self._sessionmaker() as session:
            rows = await ApiKeyRepository.from_session(session).identities_changed_since(
                self._watermark - _REFRESH_OVERLAP
            )
        for key, plan_code, disabled_at in rows:
            self._known.add(_fingerprint(key.key_hash))
            if key.key_hash in self._by_hash or key.key_hash in self._unknown:
                self._unknown.discard(key.key_hash)
                identity = _identity(key, plan_code, owner_disabled=disabled_at is not None)
                if self._by_hash.get(key.key_hash) != identity:
                    self.revision += 1
                self._by_hash[key.key_hash] = identity
        self._watermark = started

    async def _refreshed(self) -> None:
        """Wait for a refresh that starts after now (bounded: the database may be down)."""
        if self._next_refresh is None:
            self._next_refresh = asyncio.get_running_loop().create_future()
        waiting = self._next_refresh
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiting), _UNKNOWN_KEY_WAIT)
        except TimeoutError:
            pass

    def changed(self) -> None:
        """Keys or users changed somewhere (a pushed notice): refresh now, not at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="key-cache-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._refresh_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            waiting, self._next_refresh = self._next_refresh, None
            try:
                await self.refresh()
            except Exception:  # a database hiccup must not stop revocations for good
                log.exception("refreshing the API key cache failed; retrying")
            finally:
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            # However often unknown keys wake it, refresh at most this often.
            await asyncio.sleep(_MIN_REFRESH_INTERVAL)


def _usable(identity: KeyIdentity) -> KeyIdentity:
    """The identity, unless its key is revoked or expired (then the error the client gets)."""
    if identity.revoked:
        raise _invalid_key()
    if identity.expires_at is not None and identity.expires_at <= time.time():
        raise AuthenticationFailed(
            "This API key has expired. Create a new key in the dashboard.",
            code="expired_api_key",
        )
    return identity


def _invalid_key() -> AuthenticationFailed:
    return AuthenticationFailed(
        "Incorrect API key provided. Check the key, or create a new one in the dashboard.",
        code="invalid_api_key",
    )
