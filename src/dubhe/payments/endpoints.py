"""``/api`` payment routes: start a Stripe Checkout, and Stripe's webhook.

The webhook is not key-authenticated: Stripe calls it, and its signature is its authentication.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import CheckoutIn, CheckoutOut
from dubhe.models.base import utcnow
from dubhe.payments import service
from dubhe.web.dependencies import CurrentUser, SessionDep, StateDep

router = APIRouter(tags=["payments"])


@router.post("/billing/checkout")
async def create_checkout(order: CheckoutIn, user: CurrentUser, state: StateDep) -> CheckoutOut:
    # The plan as the database has it now (not the key cache's, up to a second old), read in a
    # short transaction of its own: none stays open across the call to Stripe. A payment that
    # still arrives for no upgrade (two sessions paid) is credited to the balance by the webhook.
    async with state.sessionmaker() as session:
        current_plan = await BillingRepository.from_session(session).plan_of_user(user.user_id)
    return await service.create_checkout(state.settings, state.catalog, user_id=user.user_id,
                                         current_plan=current_plan or user.plan_code, order=order)


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
