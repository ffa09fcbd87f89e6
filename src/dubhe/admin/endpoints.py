"""``/admin/api``: the console's JSON twins. Thin routes: the admin check (``AdminDep``, on
every route), one service call, a schema out."""

from __future__ import annotations

import os
import time
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Query
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.endpoints import deliver
from dubhe.accounts.mail import mail_configured
from dubhe.admin import service
from dubhe.admin.access import AdminDep
from dubhe.admin.maintenance import MaintenanceRepository
from dubhe.admin.repository import AdminRepository
from dubhe.admin.schemas import (
    AdjustmentIn,
    AdjustmentOut,
    AdminUserDetailOut,
    AdminUserOut,
    AuditOut,
    BreakerOut,
    CodeOut,
    CodesIn,
    CodesOut,
    DayTotalOut,
    DisabledIn,
    MaintenanceIn,
    MessageOut,
    ModelOut,
    PasswordResetOut,
    PlanIn,
    UpstreamErrorOut,
    UpstreamOut,
)
from dubhe.billing.pricing import format_usd, parse_usd
from dubhe.billing.queries import current_account
from dubhe.catalog import Catalog
from dubhe.models import User
from dubhe.models.base import utcnow
from dubhe.routing import Breaker
from dubhe.web.dependencies import SessionDep, StateDep

router = APIRouter(prefix="/admin/api", tags=["admin"])

UserId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def user_out(user: User) -> AdminUserOut:
    return AdminUserOut(id=user.id, email=user.email, plan=user.plan_code,
                        is_admin=user.is_admin, disabled=user.disabled_at is not None,
                        created_at=user.created_at)


def signed_usd(text: str) -> int:
    """"-2.50" or "2.50" as signed micro-dollars (the sign is the adjustment's direction)."""
    text = text.strip()
    if text.startswith("-"):
        return -parse_usd(text[1:])
    return parse_usd(text.removeprefix("+"))


async def user_detail(session: AsyncSession, user: User, catalog: Catalog) -> AdminUserDetailOut:
    state = await current_account(session, user_id=user.id, catalog=catalog, now=utcnow())
    return AdminUserDetailOut(
        **user_out(user).model_dump(), next_plan=state.next_plan_code,
        tokens_available=state.tokens_available + state.tokens_reserved,
        balance_usd=format_usd(state.balance_uusd + state.balance_reserved_uusd),
        debt_usd=format_usd(state.debt_uusd),
        balance_uusd=state.balance_uusd + state.balance_reserved_uusd, debt_uusd=state.debt_uusd)


async def existing_user(session: AsyncSession, user_id: int) -> User:
    return await service.existing_user(session, user_id)


@router.get("/users")
async def search_users(admin: AdminDep, session: SessionDep,
                       q: Annotated[str, Query(max_length=320)] = "",
                       limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[AdminUserOut]:
    users = await AdminRepository.from_session(session).search_users(q.strip(), limit=limit)
    return [user_out(user) for user in users]


@router.get("/users/{user_id}")
async def show_user(user_id: UserId, admin: AdminDep, session: SessionDep,
                    state: StateDep) -> AdminUserDetailOut:
    return await user_detail(session, await existing_user(session, user_id), state.catalog)


@router.post("/users/{user_id}/plan")
async def set_plan(user_id: UserId, body: PlanIn, admin: AdminDep, session: SessionDep,
                   state: StateDep) -> MessageOut:
    outcome = await service.set_plan(session, service.Actor.of(admin), user_id=user_id,
                                     plan_code=body.plan, catalog=state.catalog, now=utcnow())
    return MessageOut(message=f"The user is {outcome}.")


@router.post("/users/{user_id}/balance")
async def adjust_balance(user_id: UserId, body: AdjustmentIn, admin: AdminDep,
                         session: SessionDep, state: StateDep) -> AdjustmentOut:
    applied = await service.adjust_balance(
        session, service.Actor.of(admin), user_id=user_id,
        amount_uusd=signed_usd(body.amount_usd), reason=body.reason,
        idempotency_key=body.idempotency_key, catalog=state.catalog, now=utcnow())
    return AdjustmentOut(applied=applied)


@router.post("/users/{user_id}/disabled")
async def set_disabled(user_id: UserId, body: DisabledIn, admin: AdminDep,
                       session: SessionDep) -> MessageOut:
    await service.set_disabled(session, service.Actor.of(admin), user_id=user_id,
                               disabled=body.disabled, now=utcnow())
    return MessageOut(message="The account is disabled; its keys stop within a second."
                      if body.disabled else "The account is enabled.")


@router.post("/users/{user_id}/password-reset")
async def password_reset(user_id: UserId, admin: AdminDep, session: SessionDep, state: StateDep,
                         background: BackgroundTasks) -> PasswordResetOut:
    mail = await service.password_reset(session, service.Actor.of(admin), user_id=user_id,
                                        settings=state.settings, now=utcnow())
    if mail_configured(state.settings):
        background.add_task(deliver, state.settings, mail)
        return PasswordResetOut(message=f"A reset link was e-mailed to {mail.to}.", link=None)
    link = next(line for line in mail.body.splitlines() if "/reset-password?" in line)
    return PasswordResetOut(message="No mail is configured: give the user this link (one use, "
                            "one hour).", link=link.strip())


@router.get("/models")
async def list_models(admin: AdminDep, session: SessionDep, state: StateDep) -> list[ModelOut]:
    switched = await MaintenanceRepository.from_session(session).models_in_maintenance()
    return [ModelOut(id=model.id, name=model.name,
                     status="maintenance" if model.id in switched or model.status ==
                     "maintenance" else "available",
                     upstreams=[u.name for u in state.catalog.upstreams_for(model.id)])
            for model in state.catalog.models.values()]


@router.post("/models/{model_id}/maintenance")
async def set_maintenance(model_id: Annotated[str, Path(max_length=64)], body: MaintenanceIn,
                          admin: AdminDep, session: SessionDep, state: StateDep) -> MessageOut:
    await service.set_maintenance(session, service.Actor.of(admin), model_id=model_id,
                                  on=body.maintenance, catalog=state.catalog, now=utcnow())
    return MessageOut(message=f"{model_id} is {'in maintenance' if body.maintenance else 'available'}"
                      "; every worker sees it within a second.")


def _breaker_out(breaker: Breaker, now: float, pid: int) -> BreakerOut:
    return BreakerOut(state=breaker.state.value, consecutive_failures=breaker.consecutive_failures,
                      retry_in_seconds=round(breaker.retry_in(now), 3), worker_pid=pid)


@router.get("/upstreams")
async def list_upstreams(admin: AdminDep, session: SessionDep,
                         state: StateDep) -> list[UpstreamOut]:
    """Each deployment: its routing (tier, weight), this worker's circuit breaker and the last
    failures recorded for it. Never its credential (only ``api_key_env`` names it, and neither
    is shown)."""
    failures = await AdminRepository.from_session(session).upstream_failures(per_upstream=10)
    now, pid = time.monotonic(), os.getpid()
    breakers = {d.spec.name: d.breaker for d in state.upstreams.all} if state.upstreams else {}
    return [UpstreamOut(name=u.name, kind=u.kind, base_url=u.base_url, models=list(u.models),
                        priority=u.priority, weight=u.weight,
                        breaker=_breaker_out(breakers[u.name], now, pid)
                        if u.name in breakers else None,
                        last_errors=[UpstreamErrorOut(model=f.model, outcome=f.outcome,
                                                      status_code=f.status_code,
                                                      request_id=f.request_id, at=f.created_at)
                                     for f in failures.get(u.name, [])])
            for u in state.catalog.upstreams]


@router.get("/codes")
async def list_codes(admin: AdminDep, session: SessionDep,
                     limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[CodeOut]:
    codes = await AdminRepository.from_session(session).codes(limit=limit)
    return [CodeOut(id=code.id, amount_usd=format_usd(code.amount_uusd),
                    status="revoked" if code.revoked_at else
                    "redeemed" if code.redeemed_at else "unused",
                    created_at=code.created_at, redeemed_at=code.redeemed_at)
            for code in codes]


@router.post("/codes", status_code=201)
async def mint_codes(body: CodesIn, admin: AdminDep, session: SessionDep,
                     state: StateDep) -> CodesOut:
    codes = await service.mint_codes(session, service.Actor.of(admin),
                                     amount_uusd=parse_usd(body.amount_usd), count=body.count,
                                     secret=state.settings.resolved_secret, now=utcnow())
    return CodesOut(codes=codes)


@router.post("/codes/{code_id}/revoke")
async def revoke_code(code_id: UserId, admin: AdminDep, session: SessionDep) -> MessageOut:
    await service.revoke_code(session, service.Actor.of(admin), code_id=code_id, now=utcnow())
    return MessageOut(message="The code is revoked; it can never be redeemed.")


@router.get("/totals")
async def totals(admin: AdminDep, session: SessionDep,
                 days: Annotated[int, Query(ge=1, le=366)] = 30) -> list[DayTotalOut]:
    rows = await AdminRepository.from_session(session).totals_by_day(
        service.totals_since(utcnow(), days))
    return [DayTotalOut(day=row.day, requests=row.requests, tokens=row.tokens,
                        revenue_usd=format_usd(row.revenue_uusd)) for row in rows]


@router.get("/audit")
async def audit(admin: AdminDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[AuditOut]:
    entries = await AdminRepository.from_session(session).audit(limit=limit)
    return [AuditOut(id=e.id, admin=e.admin_email, action=e.action, target=e.target,
                     detail=e.detail, at=e.created_at) for e in entries]
