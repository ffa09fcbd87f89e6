"""Plan limits on ``/v1``: requests per minute, tokens per minute and concurrent requests.

One ``PlanLimiter`` per worker. A request passes three gates in order: concurrency and requests
(``admit``, before the body is read), then tokens (``Ticket.take_tokens``, once the request is
sized: prompt bound plus the output limit held), and gives back at the end (``Ticket.finish``:
its concurrency slot, and the tokens held but not used, so TPM counts the real usage).

Who is limited: an API key with its own limits (``dubhe keys limits``) has its own budget; every
other key shares its account's plan budget, so more keys never mean more throughput.

Rates are GCRA (``_gcra.py``'s algorithm) with a burst of one minute's worth. Where the budget
lives is a ``Budget`` (``_local.py``: this process only, exact; ``_redis.py``: one budget for
every worker and instance, leased in slices so most requests make no Redis round trip).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from dubhe.errors import ServiceUnavailable
from dubhe.immutable import immutable
from dubhe.ratelimit._unauthenticated import rate_limited

if TYPE_CHECKING:
    from dubhe.catalog import PlanSpec
    from dubhe.keys.cache import KeyIdentity

T = TypeVar("T")


@immutable
class Limits:
    requests_per_minute: int
    tokens_per_minute: int
    concurrent: int


@immutable
class Standing:
    """Where a budget stands after a request: what the ``x-ratelimit-*`` headers report."""

    limit: int
    remaining: int
    reset_seconds: float  # until the budget is full again


@immutable
class Refusal:
    wait_seconds: float


class BudgetUnavailable(Exception):
    """The shared budget (Redis) cannot be reached; the policy decides what happens."""


class Budget(Protocol):
    """Where the rates and in-flight counts of one subject are kept."""

    async def take_requests(self, subject: str, limits: Limits) -> Refusal | Standing: ...

    async def take_tokens(self, subject: str, limits: Limits, tokens: int) -> Refusal | Standing: ...

    def return_tokens(self, subject: str, limits: Limits, tokens: int) -> None: ...

    async def enter(self, subject: str, limits: Limits) -> bool: ...

    def leave(self, subject: str) -> None: ...

    def tokens_standing(self, subject: str, limits: Limits) -> Standing: ...

    def requests_standing(self, subject: str, limits: Limits) -> Standing: ...


@runtime_checkable
class ImmediateBudget(Budget, Protocol):
    """A budget kept in this process: it answers at once and cannot be unavailable."""

    def enter_now(self, subject: str, limits: Limits) -> bool: ...

    def take_requests_now(self, subject: str, limits: Limits) -> Refusal | Standing: ...

    def take_tokens_now(self, subject: str, limits: Limits, tokens: int) -> Refusal | Standing: ...


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``250ms``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_HEADER_NAMES = {
    kind: (b"x-ratelimit-limit-" + kind.encode(), b"x-ratelimit-remaining-" + kind.encode(),
           b"x-ratelimit-reset-" + kind.encode())
    for kind in ("requests", "tokens")
}


def _headers(kind: str, standing: Standing) -> list[tuple[bytes, bytes]]:
    limit, remaining, reset = _HEADER_NAMES[kind]
    return [
        (limit, str(standing.limit).encode()),
        (remaining, str(standing.remaining).encode()),
        (reset, format_duration(standing.reset_seconds).encode()),
    ]


class Ticket:
    """One admitted request's hold on its subject's limits."""

    __slots__ = ("_limiter", "subject", "limits", "requests", "tokens", "held_tokens", "_inside")

    def __init__(self, limiter: PlanLimiter, subject: str, limits: Limits,
                 requests: Standing) -> None:
        self._limiter = limiter
        self.subject = subject
        self.limits = limits
        self.requests = requests
        self.tokens: Standing | None = None
        self.held_tokens = 0
        self._inside = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        tokens = self.tokens or self._limiter.tokens_standing(self.subject, self.limits)
        return _headers("requests", self.requests) + _headers("tokens", tokens)

    async def take_tokens(self, tokens: int) -> None:
        """Count ``tokens`` (the prompt bound plus the output limit held) against TPM; raises
        ``RateLimited`` when the minute's tokens cannot cover them."""
        limiter = self._limiter
        if limiter.immediate is not None:
            verdict = limiter.immediate.take_tokens_now(self.subject, self.limits, tokens)
        else:
            verdict = await limiter.guarded(
                limiter.budget.take_tokens(self.subject, self.limits, tokens))
        if isinstance(verdict, Refusal):
            self._limiter.rejected("tokens")
            error = rate_limited(
                verdict.wait_seconds,
                f"Rate limit reached for tokens per minute (limit {self.limits.tokens_per_minute}"
                f", this request needs {tokens}): retry")
            error.headers.update(_header_dict(self.headers()))
            raise error
        self.tokens = verdict
        self.held_tokens = tokens

    def finish(self, used_tokens: int | None) -> None:
        """The request is over: free its slot, and return the tokens held but not used
        (``None``: unknown, so the hold stands)."""
        if not self._inside:
            return
        self._inside = False
        self._limiter.budget.leave(self.subject)
        if used_tokens is not None and self.held_tokens > used_tokens:
            self._limiter.budget.return_tokens(self.subject, self.limits,
                                               self.held_tokens - used_tokens)


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers}


class PlanLimiter:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.immediate = budget if isinstance(budget, ImmediateBudget) else None
        # Rejections by limit, for the metrics.
        self.rejections = {"requests": 0, "tokens": 0, "concurrency": 0}
        self.on_reject: list[RejectHook] = []
        self._plan_limits: dict[str, Limits] = {}

    def rejected(self, kind: str) -> None:
        self.rejections[kind] += 1
        for hook in self.on_reject:
            hook(kind)

    async def guarded(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except BudgetUnavailable:
            # Only a fail-closed budget lets this out (a fail-open one answers from its local
            # fallback): refuse, briefly, and never with a 500.
            raise ServiceUnavailable(
                "Rate limits cannot be checked right now; retry shortly.",
                code="rate_limiter_unavailable",
                headers={"retry-after": "1"},
            ) from None

    def tokens_standing(self, subject: str, limits: Limits) -> Standing:
        return self.budget.tokens_standing(subject, limits)

    def _subject(self, identity: KeyIdentity, plan: PlanSpec) -> tuple[str, Limits]:
        """A key's own limits when the operator set any, else its account's plan budget (shared
        by all of the account's keys)."""
        if (identity.rpm_limit is None and identity.tpm_limit is None
                and identity.concurrency_limit is None):
            limits = self._plan_limits.get(plan.code)
            if limits is None:
                limits = self._plan_limits[plan.code] = Limits(
                    plan.requests_per_minute, plan.tokens_per_minute, plan.concurrent_requests)
            return f"u{identity.user_id}", limits
        return f"k{identity.key_id}", Limits(
            identity.rpm_limit or plan.requests_per_minute,
            identity.tpm_limit or plan.tokens_per_minute,
            identity.concurrency_limit or plan.concurrent_requests)

    async def admit_key(self, identity: KeyIdentity, plan: PlanSpec) -> Ticket:
        """``admit`` for a key (see ``_subject`` for whose budget it spends)."""
        return await self.admit(*self._subject(identity, plan))

    def standing_headers(self, identity: KeyIdentity, plan: PlanSpec) -> list[tuple[bytes, bytes]]:
        """The ``x-ratelimit-*`` headers for an answer that counts nothing (``/v1/models``)."""
        subject, limits = self._subject(identity, plan)
        return (_headers("requests", self.budget.requests_standing(subject, limits))
                + _headers("tokens", self.budget.tokens_standing(subject, limits)))

    async def admit(self, subject: str, limits: Limits) -> Ticket:
        """Concurrency, then requests per minute; raises ``RateLimited`` (429) over either."""
        budget, immediate = self.budget, self.immediate
        entered = (immediate.enter_now(subject, limits) if immediate is not None
                   else await self.guarded(budget.enter(subject, limits)))
        if not entered:
            self.rejected("concurrency")
            standing = self.tokens_standing(subject, limits)
            error = rate_limited(
                1.0,
                f"Rate limit reached for concurrent requests (limit {limits.concurrent}): wait "
                "for one of your requests to finish, or retry")
            error.headers.update(_header_dict(
                _headers("requests", Standing(limits.requests_per_minute, 0, 0.0))
                + _headers("tokens", standing)))
            raise error
        try:
            verdict = (immediate.take_requests_now(subject, limits) if immediate is not None
                       else await self.guarded(budget.take_requests(subject, limits)))
        except BaseException:
            budget.leave(subject)
            raise
        if isinstance(verdict, Refusal):
            budget.leave(subject)
            self.rejected("requests")
            error = rate_limited(
                verdict.wait_seconds,
                f"Rate limit reached for requests per minute (limit "
                f"{limits.requests_per_minute}): retry")
            error.headers.update(_header_dict(
                _headers("requests", Standing(limits.requests_per_minute, 0,
                                              verdict.wait_seconds))
                + _headers("tokens", self.tokens_standing(subject, limits))))
            raise error
        return Ticket(self, subject, limits, verdict)


class RejectHook(Protocol):
    def __call__(self, kind: str) -> None: ...


__all__ = [
    "Budget",
    "BudgetUnavailable",
    "Limits",
    "PlanLimiter",
    "Refusal",
    "Standing",
    "Ticket",
    "format_duration",
]
