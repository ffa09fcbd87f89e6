"""What /admin/api takes and answers."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field


class AdminUserOut(BaseModel):
    id: int
    email: str
    plan: str
    is_admin: bool
    disabled: bool
    created_at: datetime


class AdminUserDetailOut(AdminUserOut):
    next_plan: str | None
    tokens_available: int
    balance_usd: str
    debt_usd: str
    balance_uusd: int
    debt_uusd: int


class PlanIn(BaseModel):
    plan: str = Field(min_length=1, max_length=32)


class AdjustmentIn(BaseModel):
    amount_usd: str = Field(max_length=32, description="positive to credit, negative to take back")
    reason: str = Field(max_length=200)
    idempotency_key: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class AdjustmentOut(BaseModel):
    applied: bool  # False: this idempotency key was applied already


class DisabledIn(BaseModel):
    disabled: bool


class PasswordResetOut(BaseModel):
    message: str
    link: str | None  # only when no mail is configured: the operator passes it on


class ModelOut(BaseModel):
    id: str
    name: str
    status: Literal["available", "maintenance"]
    upstreams: list[str]


class MaintenanceIn(BaseModel):
    maintenance: bool


class UpstreamErrorOut(BaseModel):
    model: str
    outcome: str
    status_code: int
    request_id: str
    at: datetime


class BreakerOut(BaseModel):
    """One deployment's circuit breaker as the answering worker sees it (breakers live in each
    worker's memory; ``worker_pid`` says which worker answered)."""

    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    retry_in_seconds: float
    worker_pid: int


class UpstreamOut(BaseModel):
    name: str
    kind: str
    base_url: str
    models: list[str]
    priority: int
    weight: int
    breaker: BreakerOut | None  # None where this process routes nothing (the web app alone)
    last_errors: list[UpstreamErrorOut]


class CodesIn(BaseModel):
    amount_usd: str = Field(max_length=32)
    count: int = Field(ge=1, le=1000)


class CodesOut(BaseModel):
    codes: list[str]


class CodeOut(BaseModel):
    id: int
    amount_usd: str
    status: Literal["unused", "redeemed", "revoked"]
    created_at: datetime
    redeemed_at: datetime | None


class DayTotalOut(BaseModel):
    day: date
    requests: int
    tokens: int
    revenue_usd: str


class AuditOut(BaseModel):
    id: int
    admin: str
    action: str
    target: str
    detail: str
    at: datetime


class MessageOut(BaseModel):
    message: str
