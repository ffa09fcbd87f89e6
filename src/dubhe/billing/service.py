"""Billing rules: admission, settlement, renewal, credits and plan changes.

Every function here runs inside a transaction its caller opened and that holds the account's
lock (``BillingRepository.lock_accounts``); none commits. The state they change in memory is
written back by the caller with one guarded update per account (see ``meter.py``), or by
``commit_state`` for the one-off operations (credits, plan changes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from dubhe.billing.periods import add_months, current_period
from dubhe.billing.pricing import format_usd, split_cost
from dubhe.billing.repository import COUNTERS, AccountState, BillingRepository
from dubhe.catalog import Catalog, ModelSpec, PlanSpec
from dubhe.errors import InsufficientQuota, NotFound, ServiceUnavailable, UnprocessableRequest
from dubhe.immutable import immutable
from dubhe.models import Account

PlanChange = Literal["upgraded", "scheduled", "unchanged"]


@dataclass(slots=True)
class Posting:
    """What a transaction changes: ledger rows, and the net delta per account to write back."""

    ledger: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[int, dict[str, int]] = field(default_factory=dict)
    plan_changes: dict[int, str] = field(default_factory=dict)
    account_fields: dict[int, dict[str, Any]] = field(default_factory=dict)
    epoch_bumps: set[int] = field(default_factory=set)

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

    def bump_epoch(self, state: AccountState) -> None:
        """Mark a change that must stop or alter admission (a debt, a plan change): when this
        posting is written, the account's epoch goes up by one, and every worker retires its
        lease of the older epoch within a second (``Meter``'s epoch refresh). Once per posting
        however often it is called."""
        if state.user_id not in self.epoch_bumps:
            self.epoch_bumps.add(state.user_id)
            state.epoch += 1
            self._delta(state.user_id)

    def set_fields(self, state: AccountState, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(state, name, value)
        self.account_fields.setdefault(state.user_id, {}).update(fields)
        self._delta(state.user_id)

    async def write(self, repository: BillingRepository, now: datetime) -> None:
        for user_id in sorted(self.deltas):
            fields = dict(self.account_fields.get(user_id, {}))
            if user_id in self.epoch_bumps:
                fields["epoch"] = Account.epoch + 1
            await repository.apply_deltas(user_id, self.deltas[user_id], now, **fields)
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
        ref = f"{state.user_id}:{state.period_start.isoformat()}"
        posting.post(state, "grant", ref, now,
                     f"{catalog.plans[state.plan_code].name} plan: included tokens",
                     tokens_available=included)
        collect_debt(posting, state, ref=f"grant:{ref}", now=now)


async def renew_if_due(repository: BillingRepository, posting: Posting, state: AccountState,
                       catalog: Catalog, now: datetime) -> None:
    """The first request after a period ends renews it (no cron): leftover included tokens
    expire, a pending downgrade applies, a paid plan is paid from the balance or falls back to
    the free plan, and the new period's tokens are granted. Runs under the account lock, and the
    period's unique key makes it happen once however many requests race it.

    The renewal sees the whole balance: when the price is more than what is available but not
    more than what is available plus what workers hold leased, it waits for the leases to return
    (a worker returns its lease of an ended period as soon as the requests running on it settle,
    see ``meter.py``) and the period stays ended until then; ``require_current_period`` turns
    that into a 503 with ``retry-after: 1`` for the requests that come meanwhile."""
    if now < state.period_end:
        return
    plan_code = state.next_plan_code or state.plan_code
    if plan_code not in catalog.plans:
        plan_code = catalog.default_plan
    price_uusd = catalog.plans[plan_code].price_cents * 10_000
    if state.balance_uusd < price_uusd <= state.balance_uusd + state.balance_reserved_uusd:
        return
    start, end = current_period(state.period_end, now)
    _close_period(posting, state, now, "included tokens of the ended period expire")
    if price_uusd > 0:
        if state.balance_uusd >= price_uusd:
            posting.post(state, "renewal", f"{state.user_id}:{start.isoformat()}", now,
                         f"{catalog.plans[plan_code].name} plan renewal",
                         balance_uusd=-price_uusd)
        else:
            plan_code = catalog.default_plan
    await _open_period(repository, posting, state, plan_code, start, end, catalog, now)


def require_current_period(state: AccountState, now: datetime) -> None:
    """Refuse to lease credit of an ended period whose renewal waits for leased balance."""
    if now >= state.period_end:
        raise ServiceUnavailable(
            "Your plan is renewing; retry in a second.", code="billing_unavailable",
            headers={"retry-after": "1"},
        )


def _close_period(posting: Posting, state: AccountState, now: datetime, why: str) -> None:
    """The included tokens left in the current period expire (no rollover)."""
    posting.post(state, "expire", f"{state.user_id}:{state.period_start.isoformat()}", now, why,
                 tokens_available=-state.tokens_available)


async def _open_period(repository: BillingRepository, posting: Posting, state: AccountState,
                       plan_code: str, start: datetime, end: datetime, catalog: Catalog,
                       now: datetime) -> None:
    """``plan_code`` from ``start`` to ``end``, with its included tokens granted.

    Every plan change comes here (renewal, a downgrade at period end, an upgrade, an operator's
    change, a card purchase), and bumps the account's epoch: every worker retires its lease of
    the old period within a second, so no request is admitted against a plan the account no
    longer has (requests already running settle against what they were admitted with)."""
    posting.set_fields(state, plan_code=plan_code, next_plan_code=None, period_start=start,
                       period_end=end)
    posting.plan_changes[state.user_id] = plan_code
    posting.bump_epoch(state)
    await _grant_period(repository, posting, state, catalog, now)


async def current_accounts(repository: BillingRepository, posting: Posting, user_ids: list[int],
                           catalog: Catalog, now: datetime, *,
                           renew: bool = True) -> dict[int, AccountState]:
    """Lock the accounts, opening any that do not exist yet and renewing any that are due
    (unless ``renew`` is false: a plan change decides itself what follows an ended period)."""
    states = await repository.lock_accounts(sorted(set(user_ids)))
    for user_id in sorted(set(user_ids) - states.keys()):
        plan_code = await repository.plan_of_user(user_id)
        if plan_code is None:
            raise NotFound(f"no user with id {user_id}", code="user_not_found")
        states[user_id] = await open_account(repository, posting, user_id,
                                             plan_code if plan_code in catalog.plans else catalog.default_plan,
                                             catalog, now)
    if renew:
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
    return_leased(posting, state, ref=str(lease_id), tokens=tokens, uusd=uusd,
                  period_start=period_start, now=now, description="unused lease returned")


def return_leased(posting: Posting, state: AccountState, *, ref: str, tokens: int, uusd: int,
                  period_start: datetime, now: datetime, description: str) -> None:
    """Move credit a lease no longer holds from reserved back to available: all it did not use
    when it closes (``release_lease``), or the part its worker held free when another worker
    recalled it (``ref`` ``"<lease id>:recall:<n>"``, the lease staying open)."""
    same_period = period_start == state.period_start
    posting.post(state, "release", ref, now, description,
                 tokens_reserved=-tokens, tokens_available=tokens if same_period else 0,
                 balance_reserved_uusd=-uusd, balance_uusd=uusd)
    collect_debt(posting, state, ref=f"release:{ref}", now=now)


@immutable
class Settled:
    tokens_from_plan: int
    cost_uusd: int  # the request's full price beyond included tokens, debt included
    debt_uusd: int  # the part of it nothing available could pay


def settle_usage(posting: Posting, state: AccountState, *, request_id: str, model: ModelSpec,
                 prompt_tokens: int, completion_tokens: int, lease_tokens: int, lease_uusd: int,
                 description: str, now: datetime) -> Settled:
    """Charge a request in full, from the account, not only from one worker's lease.

    What the worker's lease paid (``lease_tokens``, ``lease_uusd``; zero when the lease closed
    before this usage reached the database) leaves the reserved counters. Usage beyond that (an
    upstream that ignored its output limit) is taken from the account's available credit,
    included tokens first, then balance; only what that cannot cover becomes debt, which bumps
    the epoch so every worker stops admitting the account within a second. Counters never go
    below zero.
    """
    plan_tokens = lease_tokens
    cost = split_cost(model, prompt_tokens, completion_tokens, plan_tokens)
    if cost > lease_uusd:
        extra = _included_tokens_for(model, prompt_tokens, completion_tokens, plan_tokens,
                                     min(prompt_tokens + completion_tokens - plan_tokens,
                                         state.tokens_available), lease_uusd)
        plan_tokens += extra
        cost = split_cost(model, prompt_tokens, completion_tokens, plan_tokens)
    else:
        extra = 0
    # The price can only be below what the lease paid if the catalog's prices changed between
    # the settlement in memory and this flush: the request then costs what it paid.
    owed = max(0, cost - lease_uusd)
    cost = lease_uusd + owed
    from_balance = min(owed, state.balance_uusd)
    debt = owed - from_balance
    # The tokens that debt is the price of (rounded up: at least one), so included tokens granted
    # later can repay it at the price the usage was charged.
    unpaid_tokens = prompt_tokens + completion_tokens - plan_tokens
    debt_tokens = -(-unpaid_tokens * debt // cost) if debt else 0
    posting.post(
        state, "settle", request_id, now, description,
        tokens_reserved=-lease_tokens, balance_reserved_uusd=-lease_uusd,
        tokens_available=-extra, balance_uusd=-from_balance,
        debt_uusd=debt, debt_tokens=debt_tokens, uncollected_uusd=debt,
    )
    if debt:
        posting.bump_epoch(state)
    return Settled(tokens_from_plan=plan_tokens, cost_uusd=cost, debt_uusd=debt)


def _included_tokens_for(model: ModelSpec, prompt_tokens: int, completion_tokens: int,
                         plan_tokens: int, most: int, paid_uusd: int) -> int:
    """How many more included tokens to spend on a usage: up to ``most``, but only on tokens the
    balance has not paid already (never so many that the price falls below ``paid_uusd``). The
    price falls as included tokens rise, so a binary search finds the largest such count."""
    low, high = 0, max(0, most)
    while low < high:
        middle = (low + high + 1) // 2
        if split_cost(model, prompt_tokens, completion_tokens, plan_tokens + middle) >= paid_uusd:
            low = middle
        else:
            high = middle - 1
    return low


def collect_debt(posting: Posting, state: AccountState, *, ref: str, now: datetime) -> None:
    """Repay the account's debt from what it has available, first thing after any credit: a
    grant of included tokens (renewal, upgrade), a top-up, a redemption, an admin credit, or a
    lease's unused credit coming back. Included tokens repay the tokens the debt is the price of,
    one for one, then balance pays the rest; a partial repayment clears the other counter in
    proportion (rounded down, so the debt never shrinks by more than was paid). ``ref`` names
    the credit that triggered it (the ledger's unique key keeps it once)."""
    if state.debt_uusd == 0 and state.debt_tokens == 0:
        return
    tokens = min(state.tokens_available, state.debt_tokens)
    if tokens == 0:
        uusd_by_tokens = 0
    elif tokens == state.debt_tokens:
        uusd_by_tokens = state.debt_uusd
    else:
        uusd_by_tokens = state.debt_uusd * tokens // state.debt_tokens
    left_uusd = state.debt_uusd - uusd_by_tokens
    left_tokens = state.debt_tokens - tokens
    money = min(state.balance_uusd, left_uusd)
    if money == 0:
        tokens_by_money = 0
    elif money == left_uusd:
        tokens_by_money = left_tokens
    else:
        tokens_by_money = left_tokens * money // left_uusd
    if tokens == 0 and money == 0:
        return
    posting.post(state, "repay", ref, now, "debt repaid", tokens_available=-tokens,
                 balance_uusd=-money, debt_uusd=-(uusd_by_tokens + money),
                 debt_tokens=-(tokens + tokens_by_money))


def debt_message(debt_uusd: int) -> str:
    """What an account in debt is told on every refused request."""
    return (f"Your account owes ${format_usd(debt_uusd)} for usage beyond its credit (an upstream "
            "produced more than was held). Recharge your balance to pay it; requests are refused "
            "until it is paid.")


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
    collect_debt(posting, states[user_id], ref=f"{kind}:{ref}", now=now)
    await posting.write(repository, now)
    return True


def _plan(catalog: Catalog, plan_code: str) -> PlanSpec:
    if plan_code not in catalog.plans:
        raise UnprocessableRequest(
            f"unknown plan {plan_code!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    return catalog.plans[plan_code]


def _is_upgrade(catalog: Catalog, state: AccountState, wanted: PlanSpec) -> bool:
    current = catalog.plans.get(state.plan_code)
    return current is None or wanted.price_cents > current.price_cents


async def _start_plan(repository: BillingRepository, posting: Posting, state: AccountState,
                      plan_code: str, catalog: Catalog, now: datetime) -> None:
    """``plan_code`` from now on, in a new period: the current period's tokens expire. An ended
    period is closed without renewing its plan (nothing is charged for it): the new plan's
    period replaces it."""
    _close_period(posting, state, now, "included tokens of the replaced plan expire"
                  if now < state.period_end else "included tokens of the ended period expire")
    await _open_period(repository, posting, state, plan_code, now, add_months(now), catalog, now)


async def change_plan(repository: BillingRepository, *, user_id: int, plan_code: str,
                      catalog: Catalog, now: datetime) -> AccountState:
    """An operator's plan change, at no charge: an upgrade applies at once and starts a new
    period; a downgrade waits for the period's end; after the period ended, the plan starts its
    own period now and the old plan is not renewed."""
    wanted = _plan(catalog, plan_code)
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now,
                                    renew=False))[user_id]
    if now >= state.period_end or (plan_code != state.plan_code
                                   and _is_upgrade(catalog, state, wanted)):
        await _start_plan(repository, posting, state, plan_code, catalog, now)
    elif plan_code == state.plan_code:
        posting.set_fields(state, next_plan_code=None)
    else:
        posting.set_fields(state, next_plan_code=plan_code)
    await posting.write(repository, now)
    return state


class PlanPurchase(enum.Enum):
    STARTED = "started"  # the plan bought starts now, in a new period
    CREDITED = "credited"  # no upgrade by the time it was paid: the payment went to the balance


async def buy_plan(repository: BillingRepository, *, user_id: int, plan_code: str,
                   paid_uusd: int, ref: str, catalog: Catalog, now: datetime) -> PlanPurchase:
    """Apply a plan paid for outside the balance (by card), once per ``ref``.

    What was paid is never lost: a payment that no longer buys an upgrade when it arrives (a
    second session for the plan the first one bought, a lower plan after a higher one, a plan
    the operator has since removed) is credited to the balance and the ledger says why. A plan
    bought after the period ended starts its own period without renewing the old plan."""
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now,
                                    renew=False))[user_id]
    wanted = catalog.plans.get(plan_code)
    if wanted is not None and (now >= state.period_end or _is_upgrade(catalog, state, wanted)):
        await _start_plan(repository, posting, state, plan_code, catalog, now)
        # No counter moves for the payment itself, but the account's history shows it, once
        # (the ledger's unique key on kind and ref).
        posting.post(state, "plan_purchase", ref, now, f"{wanted.name} plan bought")
        await posting.write(repository, now)
        return PlanPurchase.STARTED
    await posting.write(repository, now)
    current = catalog.plans.get(state.plan_code)
    bought = wanted.name if wanted is not None else repr(plan_code)
    await credit_balance(
        repository, user_id=user_id, amount_uusd=paid_uusd, kind="topup", ref=ref,
        description=(f"payment for the {bought} plan credited to your balance: the account "
                     f"already had the {current.name if current else state.plan_code} plan"),
        catalog=catalog, now=now)
    return PlanPurchase.CREDITED


# -- payments taken back (refunds, disputes) and given back ------------------------------------


@dataclass(frozen=True, slots=True)
class TakenBack:
    taken_uusd: int  # from the balance
    owed_uusd: int  # what the balance could not cover: the account owes it


async def take_back(repository: BillingRepository, *, user_id: int, amount_uusd: int, kind: str,
                    ref: str, description: str, catalog: Catalog, now: datetime) -> TakenBack:
    """Take a credit back (a refunded or disputed payment), once per (kind, ref): from the
    available balance, and what that cannot cover as a debt of the account.

    Balance that workers hold leased is not touched here (requests may be spending it); the
    debt bumps the epoch, so every worker retires its lease within a second, and the unused part
    coming back repays the debt first (``release_lease``), as does every later credit."""
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now))[user_id]
    taken = min(amount_uusd, state.balance_uusd)
    owed = amount_uusd - taken
    posting.post(state, kind, ref, now, description, balance_uusd=-taken, debt_uusd=owed)
    if owed:
        posting.bump_epoch(state)
    await posting.write(repository, now)
    return TakenBack(taken, owed)


async def give_back(repository: BillingRepository, *, user_id: int, taken: TakenBack, kind: str,
                    ref: str, description: str, catalog: Catalog, now: datetime) -> None:
    """Undo a ``take_back`` (a dispute won), once per (kind, ref): the whole amount is credited
    again, and like every credit it repays any debt first (the one the take-back made, if it is
    still unpaid), so the account ends as if the payment had never been disputed."""
    posting = Posting()
    state = (await current_accounts(repository, posting, [user_id], catalog, now))[user_id]
    posting.post(state, kind, ref, now, description,
                 balance_uusd=taken.taken_uusd + taken.owed_uusd)
    collect_debt(posting, state, ref=f"{kind}:{ref}", now=now)
    await posting.write(repository, now)


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
    # Not renewed first: a plan bought after the period ended starts its own period, and the
    # old plan is not charged for (``change_plan``).
    state = (await current_accounts(repository, posting, [user_id], catalog, now,
                                    renew=False))[user_id]
    current = catalog.plans[state.plan_code]
    if wanted.price_cents <= current.price_cents:
        raise UnprocessableRequest(
            f"{wanted.name} is not an upgrade from {current.name}; downgrades are free and "
            "take effect at the end of the period", param="plan", code="invalid_value",
        )
    price_uusd = wanted.price_cents * 10_000
    if state.balance_uusd < price_uusd <= state.balance_uusd + state.balance_reserved_uusd:
        # The balance covers it, but workers hold part of it leased for requests in flight;
        # unused leases return within seconds (idle), and then the purchase goes through.
        raise ServiceUnavailable(
            f"Part of your balance is held by requests in flight; the {wanted.name} plan can be "
            "paid once it returns, in a few seconds: retry shortly.",
            code="billing_unavailable", headers={"retry-after": "2"},
        )
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
    state = (await current_accounts(repository, posting, [user_id], catalog, now,
                                    renew=False))[user_id]
    await posting.write(repository, now)
    current, wanted = catalog.plans[state.plan_code], catalog.plans[plan_code]
    if wanted.price_cents > current.price_cents:
        state = await buy_plan_from_balance(repository, user_id=user_id, plan_code=plan_code,
                                            catalog=catalog, now=now, ref=ref)
        return "upgraded", wanted.price_cents * 10_000, state
    previous, ended = state.plan_code, now >= state.period_end
    state = await change_plan(repository, user_id=user_id, plan_code=plan_code, catalog=catalog,
                              now=now)
    if ended and plan_code != previous:
        # The period had ended: the chosen plan started now, in a new period (nothing renewed).
        return "upgraded", 0, state
    return ("unchanged" if plan_code == state.plan_code else "scheduled"), 0, state
