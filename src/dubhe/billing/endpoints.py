"""``/api`` billing routes: the caller's account, usage, ledger, and redeeming a code.

Thin: each route authenticates, calls one billing function in the request's transaction and
returns a schema. Every query is scoped to the authenticated caller's user id.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from dubhe.accounts.sessions import SessionWriterDep
from dubhe.billing.codes import redeem_code
from dubhe.billing.pricing import format_usd
from dubhe.billing.queries import (
    BillingQueries,
    StatementLine,
    UsageBucket,
    current_account,
    totals_by_model,
    usage_summary,
    usage_window_start,
)
from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import (
    AccountOut,
    KeyUsageOut,
    LedgerEntryOut,
    LedgerPage,
    ModelUsageOut,
    PlanChangeIn,
    PlanChangeOut,
    RedeemIn,
    RedeemOut,
    RequestOut,
    RequestPage,
    StatementLineOut,
    StatementPage,
    UsageDay,
    UsageOut,
    UsageSummaryOut,
)
from dubhe.billing.service import choose_plan
from dubhe.gateway.asgi import new_request_id
from dubhe.models import UsageRecord
from dubhe.models.base import utcnow
from dubhe.web.dependencies import CurrentUser, RowCursor, SessionDep, StateDep

# The most rows one CSV export carries (a period's requests); the JSON pages go further.
CSV_ROW_LIMIT = 100_000
Period = Literal["current", "previous"]

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
    return UsageOut(days=days, since=since, data=usage_days(buckets))


def usage_days(buckets: Iterable[UsageBucket]) -> list[UsageDay]:
    return [
        UsageDay(date=bucket.day.isoformat(), model=bucket.model, requests=bucket.requests,
                 prompt_tokens=bucket.prompt_tokens, completion_tokens=bucket.completion_tokens,
                 tokens_from_plan=bucket.tokens_from_plan, cost_usd=format_usd(bucket.cost_uusd))
        for bucket in buckets
    ]


@router.get("/usage/summary")
async def get_usage_summary(user: CurrentUser, session: SessionDep, state: StateDep,
                            period: Period = "current") -> UsageSummaryOut:
    """Usage per day and model, per model and per key, in the current or previous period."""
    summary = await usage_summary(session, user_id=user.user_id, catalog=state.catalog,
                                  now=utcnow(), previous=period == "previous")
    return UsageSummaryOut(
        period=period, period_start=summary.period_start, period_end=summary.period_end,
        days=usage_days(summary.days),
        models=[ModelUsageOut(model=total.model, requests=total.requests,
                              prompt_tokens=total.prompt_tokens,
                              completion_tokens=total.completion_tokens,
                              cost_usd=format_usd(total.cost_uusd))
                for total in totals_by_model(summary.days)],
        keys=[KeyUsageOut(key_id=key.key_id, name=key.name, prefix=key.prefix,
                          requests=key.requests, tokens=key.tokens,
                          cost_usd=format_usd(key.cost_uusd)) for key in summary.keys],
    )


@router.get("/usage/requests")
async def get_requests(user: CurrentUser, session: SessionDep,
                       limit: Annotated[int, Query(ge=1, le=200)] = 50,
                       before: RowCursor = None) -> RequestPage:
    """The caller's requests, newest first (``?before=`` pages on)."""
    rows, next_before = await BillingQueries.from_session(session).requests_page(
        user.user_id, limit=limit, before=before)
    return RequestPage(data=[request_out(row) for row in rows], next_before=next_before)


def request_out(row: UsageRecord) -> RequestOut:
    return RequestOut(request_id=row.request_id, created_at=row.created_at, model=row.model,
                      api_key_id=row.api_key_id, stream=row.stream,
                      prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                      cost_usd=format_usd(row.cost_uusd), status_code=row.status_code,
                      outcome=row.outcome, usage_source=row.usage_source)


@router.get("/usage/requests.csv", response_class=Response)
async def get_requests_csv(user: CurrentUser, session: SessionDep, state: StateDep,
                           period: Period = "current") -> Response:
    """Every request of the current or previous period, as CSV."""
    summary_window = await usage_summary(session, user_id=user.user_id, catalog=state.catalog,
                                         now=utcnow(), previous=period == "previous")
    rows, _ = await BillingQueries.from_session(session).requests_page(
        user.user_id, limit=CSV_ROW_LIMIT, since=summary_window.period_start,
        until=summary_window.period_end)
    header = ("created_at", "request_id", "model", "api_key_id", "stream", "prompt_tokens",
              "completion_tokens", "cost_usd", "status_code", "outcome", "usage_source")
    return csv_response(f"dubhe-requests-{period}.csv", header, [
        (row.created_at.isoformat(), row.request_id, row.model, row.api_key_id or "", row.stream,
         row.prompt_tokens, row.completion_tokens, format_usd(row.cost_uusd), row.status_code,
         row.outcome, row.usage_source) for row in rows
    ])


def csv_response(filename: str, header: Sequence[str],
                 rows: Iterable[Sequence[object]]) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8", headers={
        "content-disposition": f'attachment; filename="{filename}"', "cache-control": "no-store",
    })


@router.get("/ledger")
async def get_ledger(user: CurrentUser, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     before: RowCursor = None) -> LedgerPage:
    rows, next_before = await BillingQueries.from_session(session).ledger_page(
        user.user_id, limit=limit, before=before
    )
    return LedgerPage(next_before=next_before, data=[
        LedgerEntryOut(id=row.id, kind=row.kind, ref=row.ref, description=row.description,
                       created_at=row.created_at, tokens_available=row.tokens_available,
                       tokens_reserved=row.tokens_reserved,
                       balance_usd=format_usd(row.balance_uusd),
                       balance_reserved_usd=format_usd(row.balance_reserved_uusd),
                       uncollected_usd=format_usd(row.uncollected_uusd),
                       debt_usd=format_usd(row.debt_uusd))
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


@router.get("/billing/statement")
async def get_statement(user: CurrentUser, session: SessionDep,
                        limit: Annotated[int, Query(ge=1, le=200)] = 50,
                        before: RowCursor = None) -> StatementPage:
    """The ledger as a statement: each line's change to the balance and to the included
    tokens, with the balance after it; newest first (``?before=`` pages on)."""
    lines, next_before = await BillingQueries.from_session(session).statement_page(
        user.user_id, limit=limit, before=before)
    return StatementPage(data=[statement_line_out(line) for line in lines],
                         next_before=next_before)


def statement_line_out(line: StatementLine) -> StatementLineOut:
    return StatementLineOut(id=line.id, created_at=line.created_at, kind=line.kind,
                            description=line.description, tokens=line.tokens,
                            amount_usd=format_usd(line.amount_uusd),
                            balance_usd=format_usd(line.balance_after_uusd))


@router.get("/billing/statement.csv", response_class=Response)
async def get_statement_csv(user: CurrentUser, session: SessionDep) -> Response:
    lines, _ = await BillingQueries.from_session(session).statement_page(
        user.user_id, limit=CSV_ROW_LIMIT)
    return csv_response("dubhe-statement.csv", (
        "id", "created_at", "kind", "description", "tokens", "amount_usd", "balance_usd",
    ), [
        (line.id, line.created_at.isoformat(), line.kind, line.description, line.tokens,
         format_usd(line.amount_uusd), format_usd(line.balance_after_uusd)) for line in lines
    ])


@router.post("/billing/plan")
async def post_plan(body: PlanChangeIn, request: Request, user: SessionWriterDep,
                    session: SessionDep, state: StateDep) -> PlanChangeOut:
    """Change plan (a dashboard session only: a leaked API key cannot buy plans). An upgrade is
    paid from the balance and starts a new period now (402 if the balance cannot cover it: pay
    by card through /api/billing/checkout); a downgrade waits for the period's end; the
    current plan again cancels a waiting downgrade."""
    change, paid, account = await choose_plan(
        BillingRepository.from_session(session), user_id=user.id, plan_code=body.plan,
        catalog=state.catalog, now=utcnow(), ref=request_ref(request))
    return PlanChangeOut(change=change, paid_usd=format_usd(paid),
                         account=AccountOut.from_state(account, state.catalog))


def request_ref(request: Request) -> str:
    """The request's id, the idempotency key of what it writes to the ledger."""
    return str(request.scope.get("state", {}).get("request_id") or new_request_id())
