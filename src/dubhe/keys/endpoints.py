"""``/api/keys``: list, create and revoke API keys, and the playground's short-lived key.

Listing is a read (an API key or a session may do it); creating and revoking need a dashboard
session and its CSRF token, so a leaked key cannot mint more keys or revoke its owner's.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from dubhe.accounts.sessions import SessionWriterDep
from dubhe.billing.pricing import parse_usd
from dubhe.errors import UnprocessableRequest
from dubhe.keys import service
from dubhe.keys.schemas import CreatedKeyOut, KeyCreateIn, KeyList, KeyOut, PlaygroundKeyOut
from dubhe.models.base import utcnow
from dubhe.web.dependencies import CurrentUser, SessionDep, StateDep

router = APIRouter(tags=["keys"])


@router.get("/keys")
async def list_keys(user: CurrentUser, session: SessionDep) -> KeyList:
    rows = await service.list_keys(session, user.user_id, now=utcnow())
    return KeyList(data=[KeyOut.from_row(row) for row in rows])


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreateIn, user: SessionWriterDep, session: SessionDep,
                     state: StateDep) -> CreatedKeyOut:
    now = utcnow()
    expires_at = body.expires_at
    if expires_at is not None and expires_at.tzinfo is None:
        raise UnprocessableRequest("expires_at needs a time zone, e.g. 2027-01-31T00:00:00Z",
                                   param="expires_at", code="invalid_value")
    if body.expires_in_days is not None:
        expires_at = now + timedelta(days=body.expires_in_days)
    cap = parse_usd(body.spend_cap_usd, param="spend_cap_usd") if body.spend_cap_usd else None
    created = await service.create_user_key(session, user.id, secret=state.settings.resolved_secret,
                                            name=body.name, expires_at=expires_at,
                                            spend_cap_uusd=cap, now=now)
    row = service.KeyRow(key=created.key, status="active", last_used_at=None,
                         spend_this_month_uusd=0, is_playground=False)
    return CreatedKeyOut(**KeyOut.from_row(row).model_dump(), key=created.secret)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: int, user: SessionWriterDep, session: SessionDep) -> KeyOut:
    now = utcnow()
    key = await service.revoke_key(session, user.id, key_id, now=now)
    return KeyOut.from_row(service.KeyRow(key=key, status="revoked", last_used_at=key.last_used_at,
                                          spend_this_month_uusd=0,
                                          is_playground=key.web_session_id is not None))


@router.post("/playground/key", status_code=201)
async def playground_key(user: SessionWriterDep, session: SessionDep,
                         state: StateDep) -> PlaygroundKeyOut:
    created = await service.mint_playground_key(session, user.id, user.session_id,
                                                secret=state.settings.resolved_secret,
                                                now=utcnow())
    assert created.key.expires_at is not None
    return PlaygroundKeyOut(key=created.secret, expires_at=created.key.expires_at)
