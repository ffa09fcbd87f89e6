"""Typed dependencies of the web routes: the worker's state, a transaction, the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.catalog import Catalog
from dubhe.keys.cache import KeyCache, KeyIdentity
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


def get_state(request: Request) -> WebState:
    return request.app.state.dubhe  # type: ignore[no-any-return]


StateDep = Annotated[WebState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    # One transaction per request, committed when the route returns and before the response is
    # sent (scope="function"), rolled back if it raises. Services never commit.
    async with state.sessionmaker() as session, session.begin():
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_current_user(request: Request, state: StateDep) -> KeyIdentity:
    """The caller, by the same Bearer API key as /v1 and through the same per-worker cache,
    so a revoked key stops working here exactly when it stops working there."""
    # Checked already, before the body was read (web.app.KeyFirstMiddleware).
    identity = request.scope.get("state", {}).get("api_key_identity")
    if isinstance(identity, KeyIdentity):
        return identity
    authorization = request.headers.get("authorization")
    return await state.keys.authenticate(
        authorization.encode("latin-1") if authorization is not None else None
    )


CurrentUser = Annotated[KeyIdentity, Depends(get_current_user)]
