"""What the billing API takes and returns (USD amounts are read and written by
``billing/pricing.py``'s ``parse_usd`` and ``format_usd``).

Money crosses the API as decimal strings ("12.500000"), never JSON numbers: a float cannot hold
every cent exactly, and inside Dubhe money is integer micro-dollars (µUSD).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from dubhe.billing.pricing import format_usd
from dubhe.billing.repository import AccountState
from dubhe.catalog import Catalog

# -- account ------------------------------------------------------------------------------------


class AccountOut(BaseModel):
    """An account as its owner sees it. ``tokens_remaining`` and ``balance_usd`` are what is not
    yet spent; the ``*_reserved`` fields say how much of that is held right now by requests in
    flight and by the credit workers have leased (returned when unused). ``debt_usd`` is what
    the account owes for usage beyond all its credit: requests are refused until a credit or
    the next grant of included tokens repays it; ``uncollected_usd`` is the lifetime total of
    such usage."""

    plan: str
    plan_name: str
    next_plan: str | None
    period_start: datetime
    period_end: datetime
    tokens_included: int
    tokens_remaining: int
    tokens_reserved: int
    balance_usd: str
    balance_reserved_usd: str
    uncollected_usd: str
    debt_usd: str

    @classmethod
    def from_state(cls, state: AccountState, catalog: Catalog) -> AccountOut:
        plan = catalog.plans.get(state.plan_code)
        return cls(
            plan=state.plan_code,
            plan_name=plan.name if plan else state.plan_code,
            next_plan=state.next_plan_code,
            period_start=state.period_start,
            period_end=state.period_end,
            tokens_included=plan.included_tokens if plan else 0,
            tokens_remaining=state.tokens_available + state.tokens_reserved,
            tokens_reserved=state.tokens_reserved,
            balance_usd=format_usd(state.balance_uusd + state.balance_reserved_uusd),
            balance_reserved_usd=format_usd(state.balance_reserved_uusd),
            uncollected_usd=format_usd(state.uncollected_uusd),
            debt_usd=format_usd(state.debt_uusd),
        )


# -- usage and ledger ---------------------------------------------------------------------------


class UsageDay(BaseModel):
    date: str  # YYYY-MM-DD, UTC
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    tokens_from_plan: int
    cost_usd: str


class UsageOut(BaseModel):
    days: int
    since: datetime
    data: list[UsageDay]


class LedgerEntryOut(BaseModel):
    id: int
    kind: str
    ref: str
    description: str
    created_at: datetime
    tokens_available: int
    tokens_reserved: int
    balance_usd: str
    balance_reserved_usd: str
    uncollected_usd: str
    debt_usd: str


class LedgerPage(BaseModel):
    data: list[LedgerEntryOut]
    next_before: int | None = Field(
        description="pass as ?before= for the next (older) page; null on the last page"
    )


# -- recharge -----------------------------------------------------------------------------------


class RedeemIn(BaseModel):
    code: str = Field(min_length=1, max_length=64)


class RedeemOut(BaseModel):
    credited_usd: str
    balance_usd: str


class CheckoutIn(BaseModel):
    purpose: Literal["topup", "plan"]
    # A string, not a JSON number: amounts are exact decimals (see the module docstring).
    amount_usd: str | None = Field(default=None, max_length=32)
    plan: str | None = Field(default=None, max_length=32)


class CheckoutOut(BaseModel):
    id: str
    url: str | None


# -- usage summaries, requests, statements, plan changes ------------------------------------------


class ModelUsageOut(BaseModel):
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: str


class KeyUsageOut(BaseModel):
    key_id: int | None = Field(description="null for usage of keys that no longer exist")
    name: str | None
    prefix: str | None
    requests: int
    tokens: int
    cost_usd: str


class UsageSummaryOut(BaseModel):
    period: Literal["current", "previous"]
    period_start: datetime
    period_end: datetime
    days: list[UsageDay]
    models: list[ModelUsageOut]
    keys: list[KeyUsageOut]


class RequestOut(BaseModel):
    request_id: str
    created_at: datetime
    model: str
    api_key_id: int | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    cost_usd: str
    status_code: int
    outcome: str
    usage_source: str


class RequestPage(BaseModel):
    data: list[RequestOut]
    next_before: int | None


class StatementLineOut(BaseModel):
    id: int
    created_at: datetime
    kind: str
    description: str
    tokens: int = Field(description="change to the included tokens")
    amount_usd: str = Field(description="change to the balance, negative for a charge")
    balance_usd: str = Field(description="the balance after this line")


class StatementPage(BaseModel):
    data: list[StatementLineOut]
    next_before: int | None


class PlanChangeIn(BaseModel):
    plan: str = Field(min_length=1, max_length=32)


class PlanChangeOut(BaseModel):
    """``change``: ``upgraded`` (paid from the balance, a new period started now),
    ``scheduled`` (a downgrade at ``account.period_end``) or ``unchanged`` (the current plan
    chosen again, which cancels a scheduled downgrade)."""

    change: Literal["upgraded", "scheduled", "unchanged"]
    paid_usd: str
    account: AccountOut
