"""A worker's leased credit, in memory: admission and settlement without a database round trip.

A lease is credit the database moved from an account's available counters to its reserved ones
for this worker (see ``meter.py``). Requests hold part of it while they run and settle against it
when they end; nothing here can spend more than the lease holds, so the account can never be
overspent, whatever happens to this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from dubhe.billing.pricing import Admission, size_admission, split_cost
from dubhe.catalog import ModelSpec


@dataclass(slots=True)
class LiveLease:
    id: int
    user_id: int
    period_start: datetime
    period_end: datetime
    # The account's epoch when this lease was taken: a newer one in the database retires it.
    epoch: int
    tokens_free: int
    uusd_free: int
    # The account's available counters when this worker last looked (for response headers).
    account_tokens: int
    account_uusd: int
    grants: int = 1
    in_flight: int = 0
    last_used: float = 0.0
    # After a refill found the account empty: deny from memory until then, not from the database.
    exhausted_until: float = 0.0
    retired: bool = False

    @property
    def tokens_remaining(self) -> int:
        return self.tokens_free + self.account_tokens

    @property
    def uusd_remaining(self) -> int:
        return self.uusd_free + self.account_uusd


@dataclass(slots=True)
class Hold:
    lease: LiveLease
    model: ModelSpec
    tokens: int
    uusd: int


@dataclass(frozen=True, slots=True)
class LeaseUsage:
    """What a settled request took from its lease, and what it cost."""

    tokens_used: int  # included tokens spent from the lease
    uusd_used: int  # balance spent from the lease
    cost_uusd: int  # the full price beyond included tokens, whatever paid it


def admit(
    lease: LiveLease,
    model: ModelSpec,
    *,
    prompt_tokens: int,
    max_tokens: int,
    n: int = 1,
    final: bool,
) -> tuple[Hold, Admission] | None:
    """Hold what the request needs from the lease: the prompt plus ``max_tokens`` for each of
    ``n`` choices. Unless ``final`` (the lease holds all the account can give), a request the
    lease can only partly pay for is not admitted here: the caller refills the lease instead of
    clamping what the account could still cover."""
    admission = size_admission(
        model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        n=n,
        tokens_available=lease.tokens_free,
        balance_uusd=lease.uusd_free,
    )
    if admission is None or (admission.clamped and not final):
        return None
    lease.tokens_free -= admission.tokens
    lease.uusd_free -= admission.balance_uusd
    lease.in_flight += 1
    lease.last_used = time.monotonic()
    return Hold(lease, model, admission.tokens, admission.balance_uusd), admission


def settle(hold: Hold, *, prompt_tokens: int, completion_tokens: int) -> LeaseUsage:
    """Charge the real usage against the hold, return the rest to the lease.

    Usage beyond the hold (an upstream that ignored its output limit) is taken from the lease's
    free credit; what even that cannot cover is charged from the account when the settlement is
    flushed (``service.settle_usage``), and becomes debt only if the account cannot pay it.
    """
    lease = hold.lease
    total = prompt_tokens + completion_tokens
    from_hold = min(total, hold.tokens)
    extra_tokens = min(total - from_hold, lease.tokens_free)
    plan_tokens = from_hold + extra_tokens
    cost = split_cost(hold.model, prompt_tokens, completion_tokens, plan_tokens)
    from_hold_uusd = min(cost, hold.uusd)
    extra_uusd = min(cost - from_hold_uusd, lease.uusd_free)
    lease.tokens_free += hold.tokens - from_hold - extra_tokens
    lease.uusd_free += hold.uusd - from_hold_uusd - extra_uusd
    lease.in_flight -= 1
    lease.last_used = time.monotonic()
    return LeaseUsage(plan_tokens, from_hold_uusd + extra_uusd, cost)
