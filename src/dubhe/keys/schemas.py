"""What the key routes take and return."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from dubhe.billing.pricing import format_usd
from dubhe.keys.service import KeyRow


class KeyCreateIn(BaseModel):
    name: str = Field(default="default", max_length=100)
    # Either a moment or a number of days from now; neither: the key does not expire.
    expires_at: datetime | None = None
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    # USD as a decimal string ("25" or "12.50"), per calendar month (UTC), enforced by the meter:
    # the request that would pass it gets 402 (billing/caps.py).
    spend_cap_usd: str | None = Field(default=None, max_length=32)


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    status: str
    spend_cap_usd: str | None
    spend_this_month_usd: str
    playground: bool

    @classmethod
    def from_row(cls, row: KeyRow) -> KeyOut:
        key = row.key
        return cls(
            id=key.id, name=key.name, prefix=key.prefix, created_at=key.created_at,
            expires_at=key.expires_at, revoked_at=key.revoked_at, last_used_at=row.last_used_at,
            status=row.status,
            spend_cap_usd=format_usd(key.spend_cap_uusd) if key.spend_cap_uusd else None,
            spend_this_month_usd=format_usd(row.spend_this_month_uusd),
            playground=row.is_playground,
        )


class KeyList(BaseModel):
    data: list[KeyOut]


class CreatedKeyOut(KeyOut):
    key: str  # the full key: shown this once, never again


class PlaygroundKeyOut(BaseModel):
    key: str
    expires_at: datetime
