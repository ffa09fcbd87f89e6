"""Account rules: sign-up and the operator's user management. Services never commit."""

from __future__ import annotations

import re

from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts.passwords import MIN_PASSWORD_LENGTH, hash_password
from dubhe.accounts.repository import UserRepository
from dubhe.billing.service import open_new_account
from dubhe.catalog import Catalog
from dubhe.errors import Conflict, UnprocessableRequest
from dubhe.models import User
from dubhe.models.base import utcnow

# Deliberately loose: one "@", something on each side, a dot in the domain. Deliverability is
# proven by e-mail, not by a regex.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not _EMAIL.match(email):
        raise UnprocessableRequest(f"{email!r} is not a valid e-mail address", param="email")
    return email


async def create_user(
    session: AsyncSession,
    email: str,
    password: str,
    *,
    catalog: Catalog,
    plan: str = "free",
    is_admin: bool = False,
) -> User:
    email = normalize_email(email)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UnprocessableRequest(
            f"the password must be at least {MIN_PASSWORD_LENGTH} characters long",
            param="password",
        )
    if plan not in catalog.plans:
        raise UnprocessableRequest(
            f"unknown plan {plan!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    users = UserRepository.from_session(session)
    if await users.get_by_email(email) is not None:
        raise Conflict(f"a user with e-mail {email} already exists", code="email_taken")
    user = User(email=email, password_hash=hash_password(password), plan_code=plan, is_admin=is_admin)
    users.add(user)
    await session.flush()
    await open_new_account(session, user_id=user.id, plan_code=plan, catalog=catalog, now=utcnow())
    return user
