"""``/api`` billing routes: the caller's account, usage, ledger, and redeeming a code.

Thin: each route authenticates, calls one billing function in the request's transaction and
returns a schema. Every query is scoped to the authenticated caller's user id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from dubhe.billing.codes import redeem_code
from dubhe.billing.pricing import format_usd
from dubhe.billing.queries import BillingQueries, current_account, usage_window_start
from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import (
    AccountOut,
    LedgerEntryOut,
    LedgerPage,
    RedeemIn,
    RedeemOut,
    UsageDay,
    UsageOut,
)
from dubhe.models.base import utcnow
from dubhe.web.dependencies import CurrentUser, SessionDep, StateDep

router = APIRouter(tags=["billing"])


@router.get("/account")
async def get_account(user: CurrentUser, session: SessionDep, state: StateDep) -> AccountOut:
    account = await current_account(session, user_id=user.user_id, catalog=state.catalog,
                                    now=utcnow())
    return AccountOut.from_state(account, state.catalog)


@router.get("/usage")
async def get_usage(user: CurrentUser, session: SessionDep,
                    days: Annotated[int, Query(ge=1, le=366)] = 30) -> UsageOut:
    since = usage_window_start(utcnow(), days)
    buckets = await BillingQueries.from_session(session).usage_by_day(user.user_id, since)
    return UsageOut(days=days, since=since, data=[
        UsageDay(date=bucket.day.isoformat(), model=bucket.model, requests=bucket.requests,
                 prompt_tokens=bucket.prompt_tokens, completion_tokens=bucket.completion_tokens,
                 tokens_from_plan=bucket.tokens_from_plan, cost_usd=format_usd(bucket.cost_uusd))
        for bucket in buckets
    ])


@router.get("/ledger")
async def get_ledger(user: CurrentUser, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     # Ids are BIGINT: a larger cursor would overflow the query (a 500).
                     before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None
                     ) -> LedgerPage:
    rows, next_before = await BillingQueries.from_session(session).ledger_page(
        user.user_id, limit=limit, before=before
    )
    return LedgerPage(next_before=next_before, data=[
        LedgerEntryOut(id=row.id, kind=row.kind, ref=row.ref, description=row.description,
                       created_at=row.created_at, tokens_available=row.tokens_available,
                       tokens_reserved=row.tokens_reserved,
                       balance_usd=format_usd(row.balance_uusd),
                       balance_reserved_usd=format_usd(row.balance_reserved_uusd),
                       uncollected_usd=format_usd(row.uncollected_uusd))
        for row in rows
    ])


@router.post("/redeem")
async def redeem(body: RedeemIn, user: CurrentUser, session: SessionDep,
                 state: StateDep) -> RedeemOut:
    now = utcnow()
    amount = await redeem_code(BillingRepository.from_session(session), user_id=user.user_id,
                               code=body.code, secret=state.settings.resolved_secret,
                               catalog=state.catalog, now=now)
    account = await current_account(session, user_id=user.user_id, catalog=state.catalog, now=now)
    return RedeemOut(credited_usd=format_usd(amount), balance_usd=format_usd(account.balance_uusd))
