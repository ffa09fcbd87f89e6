"""Typed dependencies of the web routes: the worker's state, a transaction, the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.catalog import Catalog
from dubhe.keys.cache import KeyCache, KeyIdentity
from dubhe.providers import UpstreamPool
from dubhe.ratelimit import UnauthenticatedLimiter
from dubhe.settings import Settings


@dataclass(frozen=True, slots=True)
class WebState:
    """What the web app shares with the rest of the worker (one of each per process)."""

    settings: Settings
    catalog: Catalog
    sessionmaker: async_sessionmaker[AsyncSession]
    keys: KeyCache
    unauthenticated: UnauthenticatedLimiter
    # Read-only transactions that do not take SQLite's write lock (polls, live feeds).
    read_sessionmaker: async_sessionmaker[AsyncSession] | None = None
    # The worker's deployments, for the admin's view of their health (None in tests that build
    # the web app alone).
    upstreams: UpstreamPool | None = None


def get_state(request: Request) -> WebState:
    return request.app.state.dubhe  # type: ignore[no-any-return]


StateDep = Annotated[WebState, Depends(get_state)]

# A page cursor (``?before=ID``): row ids are BIGINT, and a larger number would overflow the
# query, a 500 (and on SQLite a reset keep-alive connection); beyond it is a 422.
RowCursor = Annotated[int | None, Query(ge=1, le=2**63 - 1)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    # One transaction per request, committed when the route returns and before the response is
    # sent (scope="function"), rolled back if it raises. Services never commit.
    async with state.sessionmaker() as session, session.begin():
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a read-only /api route (or redeems a code): an API key's owner, or a user
    logged in to the dashboard."""

    user_id: int
    plan_code: str
    key_id: int | None  # None when the caller is a dashboard session


async def get_current_user(request: Request, state: StateDep, session: SessionDep) -> Caller:
    """By the same Bearer API key as /v1 and through the same per-worker cache (so a revoked key
    stops working here exactly when it stops working there), or else by the dashboard session
    cookie, which must bring its CSRF token on anything but a read."""
    # Imported here: accounts.sessions builds on this module's SessionDep.
    from dubhe.accounts.sessions import SESSION_COOKIE, load_session_user, require_csrf

    # A key was checked already, before the body was read (web.app.KeyFirstMiddleware).
    checked = request.scope.get("state", {}).get("api_key_identity")
    if isinstance(checked, KeyIdentity):
        return Caller(user_id=checked.user_id, plan_code=checked.plan_code, key_id=checked.key_id)
    authorization = request.headers.get("authorization")
    if authorization is None and request.cookies.get(SESSION_COOKIE):
        user = await load_session_user(request, session)
        if user is not None:
            await require_csrf(request)
            return Caller(user_id=user.id, plan_code=user.plan_code, key_id=None)
    identity: KeyIdentity = await state.keys.authenticate(
        authorization.encode("latin-1") if authorization is not None else None
    )
    return Caller(user_id=identity.user_id, plan_code=identity.plan_code, key_id=identity.key_id)


CurrentUser = Annotated[Caller, Depends(get_current_user)]
