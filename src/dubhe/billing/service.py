"""Billing rules: admission, settlement, renewal, credits and plan changes.

Every function here runs inside a transaction its caller opened and that holds the account's
lock (``BillingRepository.lock_accounts``); none commits. The state they change in memory is
written back by the caller with one guarded update per account (see ``meter.py``), or by
``commit_state`` for the one-off operations (credits, plan changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from dubhe.billing.periods import add_months, current_period
from dubhe.billing.pricing import format_usd, split_cost
from dubhe.billing.repository import COUNTERS, AccountState, BillingRepository
from dubhe.catalog import Catalog, ModelSpec
from dubhe.errors import InsufficientQuota, NotFound, UnprocessableRequest

PlanChange = Literal["upgraded", "scheduled", "unchanged"]


@dataclass(slots=True)
class Posting:
    """What a transaction changes: ledger rows, and the net delta per account to write back."""

    ledger: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[int, dict[str, int]] = field(default_factory=dict)
    plan_changes: dict[int, str] = field(default_factory=dict)
    account_fields: dict[int, dict[str, Any]] = field(default_factory=dict)

    def post(self, state: AccountState, kind: str, ref: str, now: datetime, description: str = "",
             **changes: int) -> None:
        row: dict[str, Any] = {
            "user_id": state.user_id, "kind": kind, "ref": ref, "description": description[:255],
            "created_at": now, "uncollected_uusd": changes.pop("uncollected_uusd", 0),
        }
        if row["uncollected_uusd"]:
            state.uncollected_uusd += row["uncollected_uusd"]
            self._delta(state.user_id)["uncollected_uusd"] += row["uncollected_uusd"]
        for name in COUNTERS:
            delta = changes.get(name, 0)
            row[name] = delta
            if delta:
                setattr(state, name, getattr(state, name) + delta)
                self._delta(state.user_id)[name] += delta
        self.ledger.append(row)

    def _delta(self, user_id: int) -> dict[str, int]:
        if user_id not in self.deltas:
            self.deltas[user_id] = dict.fromkeys((*COUNTERS, "uncollected_uusd"), 0)
        return self.deltas[user_id]

    def set_fields(self, state: AccountState, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(state, name, value)
        self.account_fields.setdefault(state.user_id, {}).update(fields)
        self._delta(state.user_id)

    async def write(self, repository: BillingRepository, now: datetime) -> None:
        for user_id in sorted(self.deltas):
            await repository.apply_deltas(user_id, self.deltas[user_id], now,
                                          **self.account_fields.get(user_id, {}))
        for user_id, plan_code in self.plan_changes.items():
            await repository.set_user_plan(user_id, plan_code, now)
        await repository.insert_ledger(self.ledger)


# -- accounts and periods ---------------------------------------------------------------------


async def open_account(repository: BillingRepository, posting: Posting, user_id: int,
                       plan_code: str, catalog: Catalog, now: datetime) -> AccountState:
    """A new account on ``plan_code``: a period starting now, with the plan's tokens granted."""
    state = AccountState(user_id=user_id, plan_code=plan_code, next_plan_code=None,
                         period_start=now, period_end=add_months(now), tokens_available=0,
                         tokens_reserved=0, balance_uusd=0, balance_reserved_uusd=0,
                         uncollected_uusd=0)
    await repository.insert_account(state, now)
    await _grant_period(repository, posting, state, catalog, now)
    return state


async def open_new_account(session: Any, *, user_id: int, plan_code: str, catalog: Catalog,
                           now: datetime) -> AccountState:
    """The account of a user created just now, in the caller's transaction."""
    repository = BillingRepository.from_session(session)
    posting = Posting()
    state = await open_account(repository, posting, user_id, plan_code, catalog, now)
    await posting.write(repository, now)
    return state


async def _grant_period(repository: BillingRepository, posting: Posting, state: AccountState,
                        catalog: Catalog, now: datetime) -> None:
    included = catalog.plans[state.plan_code].included_tokens
    if await repository.insert_period(state.user_id, state.plan_code, state.period_start,
                                      state.period_end, included, now):
        posting.post(state, "grant", f"{state.user_id}:{state.period_start.isoformat()}", now,
                     f"{catalog.plans[state.plan_code].name} plan: included tokens",
                     tokens_available=included)


async def renew_if_due(repository: BillingRepository, posting: Posting, state: AccountState,
                       catalog: Catalog, now: datetime) -> None:
    """The first request after a period ends renews it (no cron): leftover included tokens
    expire, a pending downgrade applies, a paid plan is paid from the balance or falls back to
    the free plan, and the new period's tokens are granted. Runs under the account lock, and the
    period's unique key makes it happen once however many requests race it."""
    if now < state.period_end:
        return
    posting.post(state, "expire", f"{state.user_id}:{state.period_start.isoformat()}", now,
                 "included tokens of the ended period expire",
                 tokens_available=-state.tokens_available)
    start, end = current_period(state.period_end, now)
    plan_code = state.next_plan_code or state.plan_code
    if plan_code not in catalog.plans:
        plan_code = catalog.default_plan
    price_uusd = catalog.plans[plan_code].price_cents * 10_000
    if price_uusd > 0:
        if state.balance_uusd >= price_uusd:
            posting.post(state, "renewal", f"{state.user_id}:{start.isoformat()}", now,
                         f"{catalog.plans[plan_code].name} plan renewal",
                         balance_uusd=-price_uusd)
        else:
            plan_code = catalog.default_plan
    posting.set_fields(state, plan_code=plan_code, next_plan_code=None, period_start=start,
                       period_end=end)
    posting.plan_changes[state.user_id] = plan_code
    await _grant_period(repository, posting, state, catalog, now)


async def current_accounts(repository: BillingRepository, posting: Posting, user_ids: list[int],
                           catalog: Catalog, now: datetime) -> dict[int, AccountState]:
    """Lock the accounts, opening any that do not exist yet and renewing any that are due."""
    states = await repository.lock_accounts(sorted(set(user_ids)))
    for user_id in sorted(set(user_ids) - states.keys()):
        plan_code = await repository.plan_of_user(user_id)
        if plan_code is None:
            raise NotFound(f"no user with id {user_id}", code="user_not_found")
        states[user_id] = await open_account(repository, posting, user_id,
                                             plan_code if plan_code in catalog.plans else catalog.default_plan,
                                             catalog, now)
    for state in states.values():
        await renew_if_due(repository, posting, state, catalog, now)
    return states


# -- a request's reservation and settlement ---------------------------------------------------


def lease_credit(posting: Posting, state: AccountState, *, lease_ref: str, tokens: int, uusd: int,
                 now: datetime) -> None:
    """Move credit from available to reserved for a worker's lease."""
    posting.post(state, "lease", lease_ref, now, "credit leased to a worker",
                 tokens_available=-tokens, tokens_reserved=tokens,
                 balance_uusd=-uusd, balance_reserved_uusd=uusd)


def release_lease(posting: Posting, state: AccountState, *, lease_id: int, tokens: int,
                  uusd: int, period_start: datetime, now: datetime) -> None:
    """Return what a closed lease did not use. Included tokens leased in a period that has since
    ended are not returned: they expired with it."""
    same_period = period_start == state.period_start
    posting.post(state, "release", str(lease_id), now, "unused lease returned",
                 tokens_reserved=-tokens, tokens_available=tokens if same_period else 0,
                 balance_reserved_uusd=-uusd, balance_uusd=uusd)


def settle_from_lease(posting: Posting, state: AccountState, *, request_id: str, tokens: int,
                      uusd: int, uncollected_uusd: int, description: str, now: datetime) -> None:
    """Charge a request settled against a lease: what it used leaves the reserved counters."""
    posting.post(state, "settle", request_id, now, description, tokens_reserved=-tokens,
                 balance_reserved_uusd=-uusd, uncollected_uusd=uncollected_uusd)


@dataclass(frozen=True, slots=True)
class Settled:
    tokens_from_plan: int
    cost_uusd: int
    uncollected_uusd: int


def settle(posting: Posting, state: AccountState, *, request_id: str, model: ModelSpec,
           reserved_tokens: int, reserved_uusd: int, reserved_period: datetime,
           prompt_tokens: int, completion_tokens: int, now: datetime) -> Settled:
    """Charge the real usage against what was held and release the rest, never below zero.

    Used with nothing held for a request whose lease closed before its usage reached the
    database (a worker that died with settlements in its spool): it is charged from what is
    available, and what that cannot cover is recorded as uncollected. Included tokens held in a
    period that has since ended are not returned: they expired with it.
    """
    same_period = reserved_period == state.period_start
    total = prompt_tokens + completion_tokens
    from_hold = min(total, reserved_tokens)
    extra_tokens = min(total - from_hold, state.tokens_available) if same_period else 0
    plan_tokens = from_hold + extra_tokens
    cost = split_cost(model, prompt_tokens, completion_tokens, plan_tokens)
    from_hold_uusd = min(cost, reserved_uusd)
    extra_uusd = min(cost - from_hold_uusd, state.balance_uusd + reserved_uusd - from_hold_uusd)
    uncollected = cost - from_hold_uusd - extra_uusd
    returned_tokens = (reserved_tokens - from_hold) if same_period else 0
    posting.post(
        state, "settle", request_id, now,
        f"{model.id}: {prompt_tokens} prompt + {completion_tokens} completion tokens",
        tokens_reserved=-reserved_tokens,
        tokens_available=returned_tokens - extra_tokens,
        balance_reserved_uusd=-reserved_uusd,
        balance_uusd=(reserved_uusd - from_hold_uusd) - extra_uusd,
        uncollected_uusd=uncollected,
    )
    return Settled(tokens_from_plan=plan_tokens, cost_uusd=cost - uncollected,
                   uncollected_uusd=uncollected)


# -- credits and plans --------------------------------------------------------------------------


async def credit_balance(repository: BillingRepository, *, user_id: int, amount_uusd: int,
                         kind: str, ref: str, description: str, catalog: Catalog,
                         now: datetime) -> bool:
    """Add to the prepaid balance once per (kind, ref); False if that credit was already made."""
    if amount_uusd <= 0:
        raise UnprocessableRequest("the amount must be positive", param="amount")
    if await repository.ledger_entry_exists(kind, ref):
        return False
    posting = Posting()
    states = await current_accounts(repository, posting, [user_id], catalog, now)
    posting.post(states[user_id], kind, ref, now, description, balance_uusd=amount_uusd)
    await posting.write(repository, now)
    return True


async def change_plan(repository: BillingRepository, *, user_id: int, plan_code: str,
                      catalog: Catalog, now: datetime, ref: str | None = None) -> AccountState:
    """Upgrades apply at once and start a new period; downgrades wait for the period's end.
    ``ref`` names the payment that bought the plan, if one did."""
    if plan_code not in catalog.plans:
        raise UnprocessableRequest(
            f"unknown plan {plan_code!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now))[user_id]
    current, wanted = catalog.plans[state.plan_code], catalog.plans[plan_code]
    if plan_code == state.plan_code:
        posting.set_fields(state, next_plan_code=None)
    elif wanted.price_cents < current.price_cents:
        posting.set_fields(state, next_plan_code=plan_code)
    else:
        posting.post(state, "expire", f"{user_id}:{state.period_start.isoformat()}", now,
                     "included tokens of the replaced plan expire",
                     tokens_available=-state.tokens_available)
        posting.set_fields(state, plan_code=plan_code, next_plan_code=None, period_start=now,
                           period_end=add_months(now))
        posting.plan_changes[user_id] = plan_code
        await _grant_period(repository, posting, state, catalog, now)
    if ref is not None:
        # A plan paid outside the balance (by card): no counter moves, but the account's history
        # shows the purchase, once (the ledger's unique key on kind and ref).
        posting.post(state, "plan_purchase", ref, now, f"{wanted.name} plan bought")
    await posting.write(repository, now)
    return state


def lease_deadline(now: datetime, ttl_seconds: float) -> datetime:
    return now + timedelta(seconds=ttl_seconds)


async def buy_plan_from_balance(repository: BillingRepository, *, user_id: int, plan_code: str,
                                catalog: Catalog, now: datetime, ref: str) -> AccountState:
    """An upgrade paid from the prepaid balance: the payment, the replaced plan's tokens
    expiring and the new period all commit together, or none does.

    A second click cannot pay twice: once on the plan, buying it again is no upgrade. ``ref``
    (the request id) is the payment's idempotency key in the ledger."""
    wanted = catalog.plans.get(plan_code)
    if wanted is None:
        raise UnprocessableRequest(
            f"unknown plan {plan_code!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now))[user_id]
    current = catalog.plans[state.plan_code]
    if wanted.price_cents <= current.price_cents:
        raise UnprocessableRequest(
            f"{wanted.name} is not an upgrade from {current.name}; downgrades are free and "
            "take effect at the end of the period", param="plan", code="invalid_value",
        )
    price_uusd = wanted.price_cents * 10_000
    if state.balance_uusd < price_uusd:
        raise InsufficientQuota(
            f"The {wanted.name} plan costs {format_usd(price_uusd)} USD and your available "
            f"balance is {format_usd(state.balance_uusd)} USD: recharge, or pay by card.",
            param="plan",
        )
    posting.post(state, "plan_payment", ref, now, f"{wanted.name} plan, paid from the balance",
                 balance_uusd=-price_uusd)
    await posting.write(repository, now)
    return await change_plan(repository, user_id=user_id, plan_code=plan_code, catalog=catalog,
                             now=now)


async def choose_plan(repository: BillingRepository, *, user_id: int, plan_code: str,
                      catalog: Catalog, now: datetime,
                      ref: str) -> tuple[PlanChange, int, AccountState]:
    """What the dashboard's plan buttons do: an upgrade is paid from the balance (402 when it
    cannot cover the price; the page then offers the card), a downgrade waits for the period's
    end, and choosing the current plan again cancels a waiting downgrade.
    Returns the change (``upgraded``, ``scheduled``, ``unchanged``), what was paid, the account."""
    if plan_code not in catalog.plans:
        raise UnprocessableRequest(
            f"unknown plan {plan_code!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now))[user_id]
    await posting.write(repository, now)
    current, wanted = catalog.plans[state.plan_code], catalog.plans[plan_code]
    if wanted.price_cents > current.price_cents:
        state = await buy_plan_from_balance(repository, user_id=user_id, plan_code=plan_code,
                                            catalog=catalog, now=now, ref=ref)
        return "upgraded", wanted.price_cents * 10_000, state
    state = await change_plan(repository, user_id=user_id, plan_code=plan_code, catalog=catalog,
                              now=now)
    return ("unchanged" if plan_code == state.plan_code else "scheduled"), 0, state
