"""What ``/dashboard/billing`` shows: the plan and its period, included tokens left, the
balance, the plans one can move to, the ways to recharge, and the statement."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing.pricing import UUSD_PER_CENT
from dubhe.billing.queries import BillingQueries, StatementLine, current_account
from dubhe.billing.repository import AccountState
from dubhe.catalog import Catalog, PlanSpec
from dubhe.settings import Settings

STATEMENT_LINES = 25


@dataclass(frozen=True, slots=True)
class PlanChoice:
    plan: PlanSpec
    price_uusd: int
    # current | upgrade | downgrade | scheduled (the downgrade waiting for the period's end)
    relation: str
    affordable: bool  # an upgrade the balance can pay now


@dataclass(frozen=True, slots=True)
class BillingPage:
    account: AccountState
    plan: PlanSpec
    next_plan: PlanSpec | None
    tokens_included: int
    tokens_left: int
    balance_uusd: int
    choices: list[PlanChoice]
    statement: list[StatementLine]
    next_before: int | None
    card_payments: bool


async def build_billing_page(session: AsyncSession, *, user_id: int, catalog: Catalog,
                             settings: Settings, now: datetime,
                             before: int | None) -> BillingPage:
    account = await current_account(session, user_id=user_id, catalog=catalog, now=now)
    # A plan the operator has since removed from the catalog reads as the default plan, which
    # is what the account renews onto.
    plan = catalog.plans.get(account.plan_code) or catalog.plans[catalog.default_plan]
    statement, next_before = await BillingQueries.from_session(session).statement_page(
        user_id, limit=STATEMENT_LINES, before=before)
    balance = account.balance_uusd + account.balance_reserved_uusd
    choices = []
    for other in sorted(catalog.plans.values(), key=lambda p: (p.price_cents, p.code)):
        price = other.price_cents * UUSD_PER_CENT
        if other.code == plan.code:
            relation = "current"
        elif other.code == account.next_plan_code:
            relation = "scheduled"
        elif other.price_cents > plan.price_cents:
            relation = "upgrade"
        else:
            relation = "downgrade"
        choices.append(PlanChoice(plan=other, price_uusd=price, relation=relation,
                                  affordable=account.balance_uusd >= price))
    return BillingPage(
        account=account, plan=plan, next_plan=catalog.plans.get(account.next_plan_code or ""),
        tokens_included=plan.included_tokens,
        tokens_left=account.tokens_available + account.tokens_reserved,
        balance_uusd=balance, choices=choices, statement=statement, next_before=next_before,
        card_payments=card_payments_configured(settings),
    )


def card_payments_configured(settings: Settings) -> bool:
    key = settings.stripe_secret_key
    return key is not None and bool(key.get_secret_value())
