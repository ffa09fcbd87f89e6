"""``/api`` payment routes: start a Stripe Checkout, and Stripe's webhook.

Starting a checkout needs a dashboard session. The webhook is not key-authenticated: Stripe calls
it, and its signature is its authentication.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from dubhe.accounts.sessions import SessionWriterDep
from dubhe.billing.schemas import CheckoutIn, CheckoutOut
from dubhe.models.base import utcnow
from dubhe.payments import service
from dubhe.web.dependencies import SessionDep, StateDep

router = APIRouter(tags=["payments"])


@router.post("/billing/checkout")
async def create_checkout(order: CheckoutIn, user: SessionWriterDep, session: SessionDep,
                          state: StateDep) -> CheckoutOut:
    # Paying needs a dashboard session (and its CSRF token): a leaked API key cannot buy plans.
    # The plan is the database's as of now (read with the session, not the key cache's copy); the
    # request's transaction ends before the call to Stripe, so no lock is held across it. A
    # payment that still arrives for no upgrade (two sessions paid) is credited to the balance.
    await session.commit()
    return await service.create_checkout(state.settings, state.catalog, user_id=user.id,
                                         current_plan=user.plan_code, order=order)


@router.post("/stripe/webhook")
async def stripe_webhook(
    request: Request,
    session: SessionDep,
    state: StateDep,
    stripe_signature: Annotated[str | None, Header()] = None,
) -> dict[str, bool]:
    # Verified before any database work: the transaction begins at its first statement.
    event = service.verify_event(state.settings, await request.body(), stripe_signature)
    await service.apply_event(session, event, catalog=state.catalog, now=utcnow())
    return {"received": True}
