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
from typing import Literal

from dubhe.billing.pricing import Admission, size_admission, split_cost
from dubhe.catalog import ModelSpec
from dubhe.immutable import immutable

# A lease admits requests until this share of its deadline (``reservation_ttl_seconds``) after
# its last renewal began. Renewals run every third of it: a lease past this point has missed
# one, and at its deadline any worker's sweep may close it and return what it holds.
ADMIT_SHARE = 0.75


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
    # The account's available counters when this worker last looked (for a refusal's message).
    account_tokens: int
    account_uusd: int
    grants: int = 1
    # How often another worker's recall took this lease's free credit back (ledger refs).
    recalls: int = 0
    # [tokens, µUSD]: the account's unspent credit (available plus reserved) as this worker last
    # read it, less what it has settled since: the balance headers (``Meter._balance``).
    unspent: list[int] | None = None
    in_flight: int = 0
    last_used: float = 0.0
    # After a refill found the account empty: deny from memory until then, not from the database.
    exhausted_until: float = 0.0
    # Monotonic time from which it admits nothing (``ADMIT_SHARE``): set when it was taken and
    # by each renewal that found it open.
    admits_until: float = 0.0
    retired: bool = False

    @property
    def tokens_remaining(self) -> int:
        return self.tokens_free + self.account_tokens

    @property
    def uusd_remaining(self) -> int:
        return self.uusd_free + self.account_uusd


# What a refill did (``Meter._refill``, ``CapBook.refill``): took credit (or needed none),
# took none and recalled what other workers' leases hold free, or took all there was while no
# other worker holds any.
RefillOutcome = Literal["took", "recalled", "alone"]

# Why a capped key's request was not admitted from memory (``admit_capped``).
NotAdmitted = Literal["refill", "account", "cap"]


@dataclass(slots=True)
class CapLease:
    """A worker's share of a capped key's headroom this month (``billing/caps.py``): requests of
    the key hold what they may cost against it too, so the key's spend plus what is held for it
    never passes its cap, whichever worker serves it."""

    id: int
    key_id: int
    user_id: int  # the key's owner: a recall names the account
    cap_uusd: int
    month_start: datetime
    month_end: float  # epoch seconds: the lease serves no request from then on
    free: int
    in_flight: int = 0
    last_used: float = 0.0
    # After a refill found the cap's headroom short: refuse or clamp from memory until then.
    exhausted_until: float = 0.0
    admits_until: float = 0.0  # as ``LiveLease.admits_until``
    retired: bool = False
    # How often a recall took its free headroom back.
    recalls: int = 0


@dataclass(slots=True)
class Hold:
    lease: LiveLease
    model: ModelSpec
    tokens: int
    uusd: int
    # A capped key's request also holds what it may cost against the key's cap lease.
    cap: CapLease | None = None
    cap_uusd: int = 0


@immutable
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
    if hold.cap is not None:
        _settle_cap(hold.cap, hold.cap_uusd, cost)
    return LeaseUsage(plan_tokens, from_hold_uusd + extra_uusd, cost)


def admit_capped(
    lease: LiveLease,
    cap: CapLease,
    model: ModelSpec,
    *,
    prompt_tokens: int,
    max_tokens: int,
    n: int,
    final: bool,
    cap_final: bool,
) -> tuple[Hold, Admission] | NotAdmitted:
    """``admit`` for a capped key: what the request may cost beyond included tokens is held
    against both the account's lease and the key's cap lease, so it is sized (and clamped) to
    the smaller of the two. A clamp or refusal is only final if the lease that binds is final
    (``final`` for the account's, ``cap_final`` for the cap's); otherwise the answer is
    ``"refill"``. A refusal says which one binds: ``"account"`` or ``"cap"``."""
    cap_binds = cap.free < lease.uusd_free
    admission = size_admission(
        model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        n=n,
        tokens_available=lease.tokens_free,
        balance_uusd=min(lease.uusd_free, cap.free),
    )
    if admission is None or admission.clamped:
        if not (cap_final if cap_binds else final):
            return "refill"
        if admission is None:
            return "cap" if cap_binds else "account"
    moment = time.monotonic()
    lease.tokens_free -= admission.tokens
    lease.uusd_free -= admission.balance_uusd
    lease.in_flight += 1
    lease.last_used = moment
    cap.free -= admission.balance_uusd
    cap.in_flight += 1
    cap.last_used = moment
    hold = Hold(lease, model, admission.tokens, admission.balance_uusd, cap, admission.balance_uusd)
    return hold, admission


def _settle_cap(cap: CapLease, held: int, cost: int) -> None:
    """The request's full price counts against the key's cap: from its hold, then from the cap
    lease's free headroom. Beyond both (an upstream that ignored its output limit) it is still
    recorded (the key's spend is what its usage cost) and the key is refused from then on."""
    from_hold = min(cost, held)
    extra = min(cost - from_hold, max(0, cap.free))
    cap.free += held - from_hold - extra
    cap.in_flight -= 1
    cap.last_used = time.monotonic()
