"""API key rules: creation (the full key is returned once, only its HMAC is stored)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.repository import UserRepository
from dubhe.errors import NotFound, UnprocessableRequest
from dubhe.keys.format import display_prefix, generate_key, hash_key
from dubhe.keys.repository import ApiKeyRepository
from dubhe.models import ApiKey


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the full key, shown once


async def create_key(
    session: AsyncSession,
    email: str,
    *,
    secret: bytes,
    name: str = "default",
    expires_at: datetime | None = None,
    spend_cap_uusd: int | None = None,
) -> CreatedKey:
    name = name.strip()
    if not name or len(name) > 100:
        raise UnprocessableRequest("the key name must be 1 to 100 characters", param="name")
    user = await UserRepository.from_session(session).get_by_email(email.strip().lower())
    if user is None:
        raise NotFound(f"no user with e-mail {email}", code="user_not_found")
    full_key = generate_key()
    key = ApiKey(
        user_id=user.id,
        name=name,
        prefix=display_prefix(full_key),
        key_hash=hash_key(secret, full_key),
        expires_at=expires_at,
        spend_cap_uusd=spend_cap_uusd,
    )
    ApiKeyRepository.from_session(session).add(key)
    await session.flush()
    return CreatedKey(key=key, secret=full_key)
