"""API key rules: creation (the full key is returned once, only its HMAC is stored), the list a
user sees, revocation, and the playground's short-lived keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.repository import UserRepository
from dubhe.errors import Conflict, NotFound, UnprocessableRequest
from dubhe.keys.format import display_prefix, generate_key, hash_key, is_well_formed
from dubhe.keys.repository import ApiKeyRepository
from dubhe.models import ApiKey

PLAYGROUND_KEY_NAME = "Playground (this session)"
PLAYGROUND_KEY_HOURS = 12
MAX_KEYS_PER_USER = 100


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key, shown once


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One line of a user's key list."""

    key: ApiKey
    status: str  # active | expired | revoked
    last_used_at: datetime | None
    spend_this_month_uusd: int
    is_playground: bool


def month_start(now: datetime) -> datetime:
    """Spend caps are per calendar month, UTC (``billing/caps.py`` counts from the same moment)."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def key_status(key: ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


async def create_user_key(
    session: AsyncSession,
    user_id: int,
    *,
    secret: bytes,
    name: str = "default",
    expires_at: datetime | None = None,
    spend_cap_uusd: int | None = None,
    web_session_id: int | None = None,
    now: datetime | None = None,
) -> CreatedKey:
    name = name.strip()
    if not name or len(name) > 100:
        raise UnprocessableRequest("the key name must be 1 to 100 characters", param="name")
    if expires_at is not None and now is not None and expires_at <= now:
        raise UnprocessableRequest("the expiry must be in the future", param="expires_at")
    if spend_cap_uusd is not None and spend_cap_uusd <= 0:
        # Enforced by the meter (billing/caps.py); a cap of nothing is a key that cannot work.
        raise UnprocessableRequest("the spend cap must be more than zero", param="spend_cap_usd",
                                   code="invalid_value")
    keys = ApiKeyRepository.from_session(session)
    live = [key for key in await keys.for_user(user_id) if key.revoked_at is None]
    if len(live) >= MAX_KEYS_PER_USER:
        raise Conflict(f"an account can hold at most {MAX_KEYS_PER_USER} live keys; revoke one "
                       "first", code="too_many_keys")
    full_key = generate_key()
    key = ApiKey(
        user_id=user_id,
        name=name,
        prefix=display_prefix(full_key),
        key_hash=hash_key(secret, full_key),
        expires_at=expires_at,
        spend_cap_uusd=spend_cap_uusd,
        web_session_id=web_session_id,
    )
    keys.add(key)
    await session.flush()
    return CreatedKey(key=key, secret=full_key)


async def create_key(
    session: AsyncSession,
    email: str,
    *,
    secret: bytes,
    name: str = "default",
    expires_at: datetime | None = None,
    spend_cap_uusd: int | None = None,
) -> CreatedKey:
    user = await UserRepository.from_session(session).get_by_email(email.strip().lower())
    if user is None or user.deleted_at is not None:
        raise NotFound(f"no user with e-mail {email}", code="user_not_found")
    return await create_user_key(session, user.id, secret=secret, name=name,
                                 expires_at=expires_at, spend_cap_uusd=spend_cap_uusd)


async def mint_playground_key(session: AsyncSession, user_id: int, web_session_id: int, *,
                              secret: bytes, now: datetime) -> CreatedKey:
    """A key for the browser's playground: it lives 12 hours at most and ends with the session
    that asked for it. Asking again replaces it (the full key of the old one is gone anyway)."""
    await ApiKeyRepository.from_session(session).revoke(now=now, user_id=user_id,
                                                        web_session_id=web_session_id)
    return await create_user_key(
        session, user_id, secret=secret, name=PLAYGROUND_KEY_NAME,
        expires_at=now + timedelta(hours=PLAYGROUND_KEY_HOURS), web_session_id=web_session_id,
        now=now,
    )


async def list_keys(session: AsyncSession, user_id: int, *, now: datetime) -> list[KeyRow]:
    keys = ApiKeyRepository.from_session(session)
    activity = await keys.activity_since(user_id, month_start(now))
    rows = []
    for key in await keys.for_user(user_id):
        seen = activity.get(key.id)
        rows.append(KeyRow(
            key=key,
            status=key_status(key, now),
            last_used_at=seen.last_used_at if seen else key.last_used_at,
            spend_this_month_uusd=seen.spend_uusd if seen else 0,
            is_playground=key.web_session_id is not None,
        ))
    return rows


async def revoke_key(session: AsyncSession, user_id: int, key_id: int, *, now: datetime) -> ApiKey:
    keys = ApiKeyRepository.from_session(session)
    key = await keys.get_for_user(user_id, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id}", code="key_not_found", param="key_id")
    await keys.revoke(now=now, user_id=user_id, key_id=key_id)
    await session.refresh(key)
    return key


async def revoke_by_prefix(session: AsyncSession, text: str, *, secret: bytes,
                           now: datetime) -> ApiKey:
    """The operator's revoke: a full key, or the prefix the lists show (``sk-dubhe-AbCd``), as
    long as it names exactly one live key."""
    key = await _one_live_key(session, text, secret=secret)
    await ApiKeyRepository.from_session(session).revoke(now=now, key_id=key.id)
    await session.refresh(key)
    return key


async def set_key_limits(session: AsyncSession, text: str, *, secret: bytes, now: datetime,
                         rpm: int | None, tpm: int | None, concurrency: int | None,
                         clear: bool = False) -> ApiKey:
    """The operator's per-key limits (``dubhe keys limits``): each one given replaces the plan's
    for this key; ``clear`` returns the key to its plan's. ``updated_at`` moves, so every
    worker's key cache applies them within a second."""
    for name, value in (("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency)):
        if value is not None and value < 1:
            raise UnprocessableRequest(f"--{name} must be at least 1", param=name)
    key = await _one_live_key(session, text, secret=secret)
    if clear:
        key.rpm_limit = key.tpm_limit = key.concurrency_limit = None
    if rpm is not None:
        key.rpm_limit = rpm
    if tpm is not None:
        key.tpm_limit = tpm
    if concurrency is not None:
        key.concurrency_limit = concurrency
    key.updated_at = now
    await session.flush()
    return key


async def _one_live_key(session: AsyncSession, text: str, *, secret: bytes) -> ApiKey:
    """A full key, or the prefix the lists show, as long as it names exactly one live key."""
    text = text.strip().rstrip("…")
    keys = ApiKeyRepository.from_session(session)
    if is_well_formed(text):
        key = await keys.by_hash(hash_key(secret, text))
        matches = [key] if key is not None and key.revoked_at is None else []
    elif len(text) >= len("sk-dubhe-") + 2:
        matches = await keys.live_by_prefix(text)
    else:
        raise UnprocessableRequest("give the key's prefix as the key list shows it, e.g. "
                                   "sk-dubhe-AbCd, or the full key", param="key_prefix")
    if not matches:
        raise NotFound(f"no live API key starts with {text}", code="key_not_found")
    if len(matches) > 1:
        raise Conflict(f"{len(matches)} live keys start with {text}; give the full key",
                       code="ambiguous_key_prefix")
    return matches[0]
