"""Redemption codes: an operator mints them, each credits the balance once, ever.

A code looks like ``DUBHE-7KQ2-M9XD-4TPA-HV3C``: 16 characters from a 32-letter alphabet without
the look-alikes (0/O, 1/I), i.e. 80 random bits. Like API keys, only an HMAC of the code is
stored, so a leaked database holds no spendable codes.

Redeeming is one guarded update (``... WHERE redeemed_at IS NULL``) followed by the credit, in the
caller's transaction: of any number of concurrent attempts exactly one matches the row; the rest
match nothing and are told the code is spent. The ledger's unique (kind, ref) key is the backstop.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing import service
from dubhe.billing.pricing import MAX_AMOUNT_UUSD, format_usd
from dubhe.billing.repository import BillingRepository
from dubhe.catalog import Catalog
from dubhe.errors import Conflict, NotFound, UnprocessableRequest
from dubhe.models import RedemptionCode

CODE_PREFIX = "DUBHE"
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_ALPHABET_SET = frozenset(_ALPHABET)
_GROUPS, _GROUP_LENGTH = 4, 4
MAX_CODES_PER_BATCH = 1000


def generate_code() -> str:
    groups = ("".join(secrets.choice(_ALPHABET) for _ in range(_GROUP_LENGTH))
              for _ in range(_GROUPS))
    return "-".join((CODE_PREFIX, *groups))


def canonical_code(text: str) -> str | None:
    """The code in its printed form, forgiving case, spaces and missing dashes; None if it
    cannot be one."""
    body = "".join(text.split()).upper().replace("-", "")
    if body.startswith(CODE_PREFIX):
        body = body[len(CODE_PREFIX):]
    if len(body) != _GROUPS * _GROUP_LENGTH or not _ALPHABET_SET.issuperset(body):
        return None
    groups = (body[i:i + _GROUP_LENGTH] for i in range(0, len(body), _GROUP_LENGTH))
    return "-".join((CODE_PREFIX, *groups))


def hash_code(secret: bytes, code: str) -> str:
    # A distinct message prefix keeps these hashes apart from the API keys' under one secret.
    return hmac.new(secret, b"redemption-code:" + code.encode(), hashlib.sha256).hexdigest()


class RedemptionCodeRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: AsyncSession) -> RedemptionCodeRepository:
        return cls(session)

    def add_all(self, rows: list[RedemptionCode]) -> None:
        self.session.add_all(rows)

    async def claim(self, code_hash: str, user_id: int, now: datetime) -> tuple[int, int] | None:
        """Mark the code redeemed if nobody has yet; (id, amount) when this call won it."""
        statement = (
            update(RedemptionCode)
            .where(RedemptionCode.code_hash == code_hash, RedemptionCode.redeemed_at.is_(None),
                   RedemptionCode.revoked_at.is_(None))
            .values(redeemed_by=user_id, redeemed_at=now)
            .returning(RedemptionCode.id, RedemptionCode.amount_uusd)
        )
        row = (await self.session.execute(statement)).first()
        return (int(row[0]), int(row[1])) if row is not None else None

    async def exists(self, code_hash: str) -> bool:
        # A revoked code is "not valid", like one never minted.
        statement = select(RedemptionCode.id).where(RedemptionCode.code_hash == code_hash,
                                                    RedemptionCode.revoked_at.is_(None))
        return (await self.session.execute(statement)).first() is not None


async def create_codes(session: AsyncSession, *, amount_uusd: int, count: int,
                       secret: bytes) -> list[str]:
    """Mint ``count`` codes worth ``amount_uusd`` each; the codes themselves are returned once."""
    if not 0 < amount_uusd <= MAX_AMOUNT_UUSD:
        raise UnprocessableRequest(
            f"a code must be worth more than 0 and at most {format_usd(MAX_AMOUNT_UUSD)} USD",
            param="amount",
        )
    if not 1 <= count <= MAX_CODES_PER_BATCH:
        raise UnprocessableRequest(
            f"--count must be between 1 and {MAX_CODES_PER_BATCH}", param="count"
        )
    codes = [generate_code() for _ in range(count)]
    RedemptionCodeRepository.from_session(session).add_all(
        [RedemptionCode(code_hash=hash_code(secret, code), amount_uusd=amount_uusd)
         for code in codes]
    )
    await session.flush()
    return codes


async def redeem_code(repository: BillingRepository, *, user_id: int, code: str, secret: bytes,
                      catalog: Catalog, now: datetime) -> int:
    """Credit the code's amount to ``user_id``; returns it. Raises if unknown or spent."""
    canonical = canonical_code(code)
    if canonical is None:
        raise _invalid_code()
    code_hash = hash_code(secret, canonical)
    codes = RedemptionCodeRepository.from_session(repository.session)
    claimed = await codes.claim(code_hash, user_id, now)
    if claimed is None:
        if await codes.exists(code_hash):
            raise Conflict("This code has already been redeemed; each code works once.",
                           code="code_already_redeemed", param="code")
        raise _invalid_code()
    code_id, amount_uusd = claimed
    credited = await service.credit_balance(
        repository, user_id=user_id, amount_uusd=amount_uusd, kind="redeem", ref=str(code_id),
        description=f"redemption code {canonical[:len(CODE_PREFIX) + 5]}…",
        catalog=catalog, now=now,
    )
    # The guarded update above let only this transaction through; a ledger row already there
    # would mean the code table and the ledger disagree, which must not pass silently.
    if not credited:
        raise RuntimeError(f"redemption code {code_id} was claimed but already credited")
    return amount_uusd


def _invalid_code() -> NotFound:
    return NotFound("This redemption code is not valid; check it and try again.",
                    code="invalid_code", param="code")
