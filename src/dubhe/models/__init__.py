"""ORM models, one module per aggregate, imported here so metadata and Alembic see them all."""

from dubhe.models.admin import AdminAuditEntry, ModelMaintenance
from dubhe.models.api_key import ApiKey
from dubhe.models.base import Base
from dubhe.models.billing import (
    Account,
    Lease,
    LedgerEntry,
    Payment,
    PaymentReversal,
    RedemptionCode,
    SubscriptionPeriod,
)
from dubhe.models.helpchat import HelpConversation, HelpMessage
from dubhe.models.key_cap import KeyCapLease
from dubhe.models.usage import UsageRecord
from dubhe.models.user import User
from dubhe.models.web_session import AuthAttempt, WebSession

__all__ = [
    "Account",
    "AdminAuditEntry",
    "ApiKey",
    "AuthAttempt",
    "Base",
    "HelpConversation",
    "HelpMessage",
    "KeyCapLease",
    "Lease",
    "LedgerEntry",
    "ModelMaintenance",
    "Payment",
    "PaymentReversal",
    "RedemptionCode",
    "SubscriptionPeriod",
    "UsageRecord",
    "User",
    "WebSession",
]
