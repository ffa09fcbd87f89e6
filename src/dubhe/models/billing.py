"""Money and token counters, and the facts that move them.

``Account`` is a projection: every counter equals the sum of its delta column over the user's
``LedgerEntry`` rows. Counters carry ``CHECK (... >= 0)`` as a backstop behind the guarded
updates; every fact that must happen once has a unique key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from dubhe.models.base import Base, BigIntPK, UTCDateTime, utcnow


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("tokens_available >= 0", name="tokens_available_nonnegative"),
        CheckConstraint("tokens_reserved >= 0", name="tokens_reserved_nonnegative"),
        CheckConstraint("balance_uusd >= 0", name="balance_nonnegative"),
        CheckConstraint("balance_reserved_uusd >= 0", name="balance_reserved_nonnegative"),
        CheckConstraint("period_end > period_start", name="period_ordered"),
        CheckConstraint("debt_uusd >= 0", name="debt_nonnegative"),
        CheckConstraint("debt_tokens >= 0", name="debt_tokens_nonnegative"),
    )

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    plan_code: Mapped[str] = mapped_column(String(32))
    # A downgrade waits here until the period ends.
    next_plan_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    tokens_available: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_reserved_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    # Lifetime total of usage cost that nothing available could pay when it was settled (each
    # such amount became debt; this total never decreases).
    uncollected_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    # What the account owes now: usage an upstream produced beyond every credit the account had
    # (never a negative balance). ``debt_tokens`` counts the tokens that money is the price of, so
    # included tokens granted later repay it at the price the usage was charged. An account in
    # debt is refused admission until the next credit or grant repays it.
    debt_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    debt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped by every change that must stop or alter admission (a debt, a plan change): each
    # worker compares it, once a second, with the epoch its lease was taken at, and retires a
    # stale lease (see billing/meter.py).
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SubscriptionPeriod(Base):
    """One row per plan period granted: the unique key makes a renewal happen once."""

    __tablename__ = "subscription_periods"
    __table_args__ = (UniqueConstraint("user_id", "period_start"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    plan_code: Mapped[str] = mapped_column(String(32))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    included_tokens: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Lease(Base):
    """A slice of an account's credit that one worker moved from available to reserved.

    The worker admits and settles requests against the lease in memory and flushes the settled
    usage here (``tokens_used``, ``uusd_used``) in batches; what is left returns to the account
    when the lease closes, or when its deadline passes because the worker stopped renewing it.
    """

    __tablename__ = "leases"
    __table_args__ = (
        Index("ix_leases_status_expires", "status", "expires_at"),
        CheckConstraint(
            "tokens_used >= 0 AND tokens_used <= tokens AND uusd_used >= 0 AND uusd_used <= uusd",
            name="used_within_granted",
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(96))
    tokens: Mapped[int] = mapped_column(BigInteger)
    uusd: Mapped[int] = mapped_column(BigInteger)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    uusd_used: Mapped[int] = mapped_column(BigInteger, default=0)
    # Included tokens leased in a period that has since ended expire instead of returning.
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))  # open | closed
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class LedgerEntry(Base):
    """Append-only: one row per business event, with the delta it applied to each counter."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("kind", "ref"),
        Index("ix_ledger_entries_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # grant | expire | renewal | lease | settle | release | topup | redeem | credit | repay
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(128))
    tokens_available: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_reserved_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    uncollected_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    debt_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    debt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    description: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RedemptionCode(Base):
    __tablename__ = "redemption_codes"
    __table_args__ = (CheckConstraint("amount_uusd > 0", name="amount_positive"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    # HMAC of the code, like API keys: a leaked database does not leak spendable codes.
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    amount_uusd: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    redeemed_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    redeemed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Revoked by an admin before anyone redeemed it: it can never be redeemed.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Payment(Base):
    """A payment provider's event that credits balance or buys a plan, applied once per event."""

    __tablename__ = "payments"
    __table_args__ = (
        UniqueConstraint("provider", "event_id"),
        CheckConstraint("reversed_uusd >= 0 AND reversed_uusd <= amount_uusd",
                        name="reversed_within_amount"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))  # topup | plan
    amount_uusd: Mapped[int] = mapped_column(BigInteger)
    plan_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The provider's id of the money movement (Stripe's PaymentIntent): refunds and disputes
    # name it, not the Checkout Session.
    payment_intent: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # Refunded so far (the provider's cumulative figure), and taken back net of disputes won.
    refunded_uusd: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reversed_uusd: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PaymentReversal(Base):
    """A fact from the payment provider that takes a payment's credit back, or gives it back: a
    refund (Stripe's cumulative amount refunded, one row per level), a dispute, a dispute won.

    Stored as it arrives, even before the payment it reverses (webhooks come in any order), and
    applied to the account once, when both are known: ``applied_at`` is set by the one
    transaction that applied it. A row of kind ``intent`` is the lock row of one payment intent:
    every webhook touching that payment takes it first, so a reversal and its payment arriving at
    the same instant cannot miss each other.
    """

    __tablename__ = "payment_reversals"
    __table_args__ = (
        UniqueConstraint("provider", "ref"),
        Index("ix_payment_reversals_intent", "provider", "payment_intent"),
        CheckConstraint("amount_uusd >= 0 AND applied_uusd >= 0 AND owed_uusd >= 0",
                        name="amounts_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(160))  # e.g. refund:ch_...:2500, dispute:dp_...
    kind: Mapped[str] = mapped_column(String(16))  # intent | refund | dispute | dispute_won
    payment_intent: Mapped[str] = mapped_column(String(128))
    amount_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    event_id: Mapped[str] = mapped_column(String(128))
    # What applying it moved: taken from (or given back to) the account, and the part of a
    # take-back the account could not pay and owes.
    applied_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    owed_uusd: Mapped[int] = mapped_column(BigInteger, default=0)
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
