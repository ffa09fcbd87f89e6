"""The admin console's rules. Every change an admin makes is recorded in the audit log in the
same transaction (``audit``); money moves only through the billing service's functions (one
guarded transaction per account, a ledger entry, an idempotency key), never a raw update.

Services never commit: the request's session does, when the route returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.repository import WebSessionRepository
from dubhe.accounts.service import Mail, request_password_reset
from dubhe.accounts.sessions import SessionUser
from dubhe.admin.maintenance import MaintenanceRepository
from dubhe.admin.repository import AdminRepository
from dubhe.billing.codes import create_codes
from dubhe.billing.pricing import format_usd
from dubhe.billing.repository import BillingRepository
from dubhe.billing.service import change_plan, credit_balance, take_back
from dubhe.catalog import Catalog
from dubhe.errors import Conflict, NotFound, UnprocessableRequest
from dubhe.models import AdminAuditEntry, User
from dubhe.settings import Settings

# The most one adjustment may move, either way: a typo of a few zeros should not stand.
MAX_ADJUSTMENT_UUSD = 100_000 * 1_000_000


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: an admin's session, or the operator at the command line."""

    user_id: int | None
    email: str

    @classmethod
    def of(cls, admin: SessionUser) -> Actor:
        return cls(admin.id, admin.email)


OPERATOR_CLI = Actor(None, "operator (command line)")


def audit(session: AsyncSession, actor: Actor, action: str, target: str, detail: str,
           now: datetime) -> None:
    AdminRepository.from_session(session).record(AdminAuditEntry(
        admin_user_id=actor.user_id, admin_email=actor.email, action=action,
        target=target[:128], detail=detail[:500], created_at=now))


async def existing_user(session: AsyncSession, user_id: int) -> User:
    user = await AdminRepository.from_session(session).user(user_id)
    if user is None or user.deleted_at is not None:
        raise NotFound(f"No user with id {user_id}.", code="user_not_found", param="user_id")
    return user


# -- users ----------------------------------------------------------------------------------------


async def set_plan(session: AsyncSession, actor: Actor, *, user_id: int, plan_code: str,
                   catalog: Catalog, now: datetime) -> str:
    """An operator's plan change at no charge (billing's ``change_plan``); what happened."""
    user = await existing_user(session, user_id)
    state = await change_plan(BillingRepository.from_session(session), user_id=user_id,
                              plan_code=plan_code, catalog=catalog, now=now)
    outcome = (f"moves to {plan_code} at the period's end" if state.next_plan_code == plan_code
               else f"now on {state.plan_code}")
    audit(session, actor, "user.plan", user.email, outcome, now)
    return outcome


async def adjust_balance(session: AsyncSession, actor: Actor, *, user_id: int, amount_uusd: int,
                         reason: str, idempotency_key: str, catalog: Catalog,
                         now: datetime) -> bool:
    """Credit (positive) or take back (negative) prepaid balance, with the reason in the ledger
    entry the user sees. Once per idempotency key and user: a retried or double-clicked form
    applies once; False when this key was applied to this user already (the same key sent for
    another user is that user's own adjustment). A take-back larger than the balance leaves
    the rest as a debt (billing's ``take_back``), as a refund does."""
    reason = reason.strip()
    if not reason:
        raise UnprocessableRequest("A reason is required; the user sees it in their statement.",
                                   code="missing_required_parameter", param="reason")
    if amount_uusd == 0 or abs(amount_uusd) > MAX_ADJUSTMENT_UUSD:
        raise UnprocessableRequest(
            f"The amount must be non-zero and at most {format_usd(MAX_ADJUSTMENT_UUSD)} USD "
            "either way.", code="invalid_value", param="amount_usd")
    user = await existing_user(session, user_id)
    repository = BillingRepository.from_session(session)
    kind = "admin_credit" if amount_uusd > 0 else "admin_debit"
    ref = f"admin:{user_id}:{idempotency_key}"
    description = f"adjustment by support: {reason}"
    if await repository.ledger_entry_exists(kind, ref):
        return False
    try:
        # A savepoint: two requests with one key racing past the check above meet the ledger's
        # unique (kind, ref); the loser's entry is rolled back and it reports "already applied".
        async with session.begin_nested():
            if amount_uusd > 0:
                applied = await credit_balance(
                    repository, user_id=user_id, amount_uusd=amount_uusd, kind=kind, ref=ref,
                    description=description, catalog=catalog, now=now)
            else:
                await take_back(repository, user_id=user_id, amount_uusd=-amount_uusd, kind=kind,
                                ref=ref, description=description, catalog=catalog, now=now)
                applied = True
    except IntegrityError:
        return False
    if applied:
        sign = "+" if amount_uusd > 0 else "-"
        audit(session, actor, "user.balance", user.email,
               f"{sign}{format_usd(abs(amount_uusd))} USD: {reason}", now)
    return applied


async def set_disabled(session: AsyncSession, actor: Actor, *, user_id: int, disabled: bool,
                       now: datetime) -> None:
    """Disable: log-in refused, sessions ended, and every key refused on every worker within a
    second (the key caches watch ``users.updated_at``). Enable undoes it; keys work again."""
    user = await existing_user(session, user_id)
    if user.is_admin and disabled and user.id == actor.user_id:
        raise Conflict("You cannot disable your own account.", code="cannot_disable_self")
    if (user.disabled_at is not None) == disabled:
        return
    user.disabled_at = now if disabled else None
    user.updated_at = now
    if disabled:
        await WebSessionRepository.from_session(session).delete_for_user(user.id)
    audit(session, actor, "user.disable" if disabled else "user.enable", user.email, "", now)


async def password_reset(session: AsyncSession, actor: Actor, *, user_id: int,
                         settings: Settings, now: datetime) -> Mail:
    """The same one-use, one-hour reset link the user could ask for, to be e-mailed to them."""
    user = await existing_user(session, user_id)
    mail = await request_password_reset(session, user.email, settings=settings, now=now)
    if mail is None:
        raise NotFound(f"No user with id {user_id}.", code="user_not_found", param="user_id")
    audit(session, actor, "user.password_reset", user.email, "reset link sent", now)
    return mail


# -- models ---------------------------------------------------------------------------------------


async def set_maintenance(session: AsyncSession, actor: Actor, *, model_id: str, on: bool,
                          catalog: Catalog, now: datetime) -> bool:
    if model_id not in catalog.models:
        raise NotFound(f"No model {model_id!r} in the catalog.", code="model_not_found",
                       param="model")
    changed = await MaintenanceRepository.from_session(session).switch(model_id, on, now)
    if changed:
        audit(session, actor, "model.maintenance", model_id, "on" if on else "off", now)
    return changed


# -- redemption codes -----------------------------------------------------------------------------


async def mint_codes(session: AsyncSession, actor: Actor, *, amount_uusd: int, count: int,
                     secret: bytes, now: datetime) -> list[str]:
    codes = await create_codes(session, amount_uusd=amount_uusd, count=count, secret=secret)
    audit(session, actor, "codes.mint", f"{count} code(s)",
           f"{format_usd(amount_uusd)} USD each", now)
    return codes


async def revoke_code(session: AsyncSession, actor: Actor, *, code_id: int,
                      now: datetime) -> None:
    if not await AdminRepository.from_session(session).revoke_code(code_id, now):
        raise Conflict("Only an unused, unrevoked code can be revoked.",
                       code="code_not_revocable", param="code_id")
    audit(session, actor, "codes.revoke", f"code {code_id}", "", now)


def totals_since(now: datetime, days: int) -> datetime:
    return (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
