"""The pages: the public homepage and the signed-in dashboard (usage, billing, playground).

Thin routes: each gathers what its page shows through the owning domain's queries and renders a
template. A form posts to a route here that calls the same service function as its ``/api``
twin, then redirects back (post/redirect/get); a refused action re-renders the page with the
error and its status. The action runs in a savepoint, so a refusal leaves nothing half-written.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.sessions import (
    OptionalSessionUserDep,
    SessionUser,
    SessionUserDep,
    SessionWriterDep,
)
from dubhe.billing.codes import redeem_code
from dubhe.billing.endpoints import request_ref
from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import CheckoutIn
from dubhe.billing.service import choose_plan
from dubhe.dashboard.billing_page import build_billing_page, card_payments_configured
from dubhe.dashboard.homepage import build_homepage
from dubhe.dashboard.templating import render, usd
from dubhe.dashboard.usage_page import build_usage_page
from dubhe.errors import DubheError, InsufficientQuota
from dubhe.models.base import utcnow
from dubhe.payments import service as payments
from dubhe.web.dependencies import RowCursor, SessionDep, StateDep, WebState

router = APIRouter(include_in_schema=False)

# What a redirect back to the billing page may say: fixed texts chosen by key, so a crafted
# link cannot make the page show words of its own.
BILLING_NOTICES = {
    "upgraded": "Your new plan is active, and a new period has started.",
    "scheduled": "Your plan changes at the end of this period.",
    "unchanged": "You stay on your current plan; no change is waiting.",
    "redeemed": "The code was redeemed and its amount added to your balance.",
    "paid": "Thank you: your payment is being confirmed and appears here within a minute.",
    "cancelled": "The payment was cancelled; nothing was charged.",
}
BILLING_ERRORS = {
    "payment_provider": "The payment provider could not start a checkout; try again in a minute.",
}


@router.get("/", response_class=HTMLResponse)
async def homepage(request: Request, state: StateDep,
                   user: OptionalSessionUserDep) -> HTMLResponse:
    page = build_homepage(state.catalog, state.settings.public_url)
    return render(request, "home.html", title="OpenAI-compatible LLM API", page=page, user=user)


# -- usage ----------------------------------------------------------------------------------------


@router.get("/dashboard/usage", response_class=HTMLResponse)
async def usage(request: Request, user: SessionUserDep, session: SessionDep, state: StateDep,
                period: Literal["current", "previous"] = "current",
                before: RowCursor = None) -> HTMLResponse:
    page = await build_usage_page(session, user_id=user.id, catalog=state.catalog, now=utcnow(),
                                  period=period, before=before)
    return render(request, "usage.html", title="Usage", page=page, user=user)


# -- billing --------------------------------------------------------------------------------------


@router.get("/dashboard/billing", response_class=HTMLResponse)
async def billing(request: Request, user: SessionUserDep, session: SessionDep, state: StateDep,
                  before: RowCursor = None,
                  notice: str | None = None, error: str | None = None) -> HTMLResponse:
    return await _billing(request, user, session, state, before=before,
                          notice=BILLING_NOTICES.get(notice or ""),
                          error=BILLING_ERRORS.get(error or ""))


@router.get("/billing")
async def checkout_return(checkout: str | None = None) -> RedirectResponse:
    """Where Stripe Checkout sends the payer back (``success_url`` and ``cancel_url``)."""
    notice = "paid" if checkout == "success" else "cancelled"
    return RedirectResponse(f"/dashboard/billing?notice={notice}", status_code=303)


@router.post("/dashboard/billing/redeem")
async def billing_redeem(request: Request, user: SessionWriterDep, session: SessionDep,
                         state: StateDep,
                         code: Annotated[str, Form(max_length=64)] = "") -> Response:
    try:
        async with session.begin_nested():
            await redeem_code(BillingRepository.from_session(session), user_id=user.id,
                              code=code, secret=state.settings.resolved_secret,
                              catalog=state.catalog, now=utcnow())
    except DubheError as exc:
        return await _billing(request, user, session, state, error=exc.message,
                              status_code=exc.status_code)
    return RedirectResponse("/dashboard/billing?notice=redeemed", status_code=303)


@router.post("/dashboard/billing/plan")
async def billing_plan(request: Request, user: SessionWriterDep, session: SessionDep,
                       state: StateDep,
                       plan: Annotated[str, Form(max_length=32)] = "") -> Response:
    try:
        async with session.begin_nested():
            change, _, _ = await choose_plan(
                BillingRepository.from_session(session), user_id=user.id, plan_code=plan,
                catalog=state.catalog, now=utcnow(), ref=request_ref(request))
    except InsufficientQuota as exc:
        if not card_payments_configured(state.settings):
            return await _billing(request, user, session, state, error=exc.message,
                                  status_code=exc.status_code)
        return await _to_checkout(session, state, user, CheckoutIn(purpose="plan", plan=plan))
    except DubheError as exc:
        return await _billing(request, user, session, state, error=exc.message,
                              status_code=exc.status_code)
    return RedirectResponse(f"/dashboard/billing?notice={change}", status_code=303)


@router.post("/dashboard/billing/topup")
async def billing_topup(request: Request, user: SessionWriterDep, session: SessionDep,
                        state: StateDep,
                        amount_usd: Annotated[str, Form(max_length=32)] = "") -> Response:
    order = CheckoutIn(purpose="topup", amount_usd=amount_usd)
    try:
        payments.checkout_params(state.settings, state.catalog, user_id=user.id,
                                 current_plan=user.plan_code, order=order)
    except DubheError as exc:
        return await _billing(request, user, session, state, error=exc.message,
                              status_code=exc.status_code)
    return await _to_checkout(session, state, user, order)


async def _to_checkout(session: AsyncSession, state: WebState, user: SessionUser,
                       order: CheckoutIn) -> Response:
    # Stripe may take seconds to answer: end the request's transaction first, so no database
    # lock (on SQLite, the write lock) is held across the call.
    await session.commit()
    try:
        checkout = await payments.create_checkout(state.settings, state.catalog,
                                                  user_id=user.id, current_plan=user.plan_code,
                                                  order=order)
    except DubheError:
        return RedirectResponse("/dashboard/billing?error=payment_provider", status_code=303)
    if checkout.url is None:
        return RedirectResponse("/dashboard/billing?error=payment_provider", status_code=303)
    return RedirectResponse(checkout.url, status_code=303)


async def _billing(request: Request, user: SessionUser, session: AsyncSession, state: WebState,
                   *, before: int | None = None, notice: str | None = None,
                   error: str | None = None, status_code: int = 200) -> HTMLResponse:
    page = await build_billing_page(session, user_id=user.id, catalog=state.catalog,
                                    settings=state.settings, now=utcnow(), before=before)
    return render(request, "billing.html", title="Plan and billing", page=page, user=user,
                  before=before, notice=notice, error=error, status_code=status_code)


# -- playground -----------------------------------------------------------------------------------


@router.get("/dashboard/playground", response_class=HTMLResponse)
async def playground(request: Request, user: SessionUserDep, state: StateDep) -> HTMLResponse:
    plan = state.catalog.plans.get(user.plan_code)
    models = [model for model in state.catalog.models.values()
              if plan is not None and model.id in plan.models]
    return render(request, "playground.html", title="Playground", models=models, user=user,
                  api_base="/v1", prices={m.id: (usd(m.input_price_uusd_per_mtok),
                                                 usd(m.output_price_uusd_per_mtok))
                                          for m in models})
