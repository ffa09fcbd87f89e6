"""Account rules: sign-up, log-in, sessions, passwords, deletion, and the operator's user
management. Services never commit (the request's transaction does), with one exception: counted
attempts (``record_attempts``) are written in their own transaction, because a failed log-in
rolls the request back and must still count.

What a caller is told never depends on whether an e-mail has an account, with one documented
exception: in sign-up modes ``open`` and ``invite`` a person signs up and is logged in at once, so
signing up with a registered address has to fail. The per-address sign-up limit bounds that probe.
In ``email-verified`` mode both cases answer "check your e-mail".
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from dubhe.accounts.links import LinkClaim, password_fingerprint, read_link, sign_link
from dubhe.accounts.passwords import MIN_PASSWORD_LENGTH, hash_password, verify_password
from dubhe.accounts.repository import AuthAttemptRepository, UserRepository, WebSessionRepository
from dubhe.accounts.session_tokens import hash_session_token, new_session_token
from dubhe.billing.service import open_new_account
from dubhe.catalog import Catalog
from dubhe.errors import (
    AuthenticationFailed,
    Conflict,
    DubheError,
    Forbidden,
    RateLimited,
    UnprocessableRequest,
)
from dubhe.keys.repository import ApiKeyRepository
from dubhe.models import User, WebSession
from dubhe.models.base import utcnow
from dubhe.settings import Settings

# Deliberately loose: one "@", something on each side, a dot in the domain. Deliverability is
# proven by e-mail, not by a regex.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; this keeps a request from taking minutes
VERIFY_LINK_HOURS = 48
RESET_LINK_HOURS = 1
INVITE_LINK_DAYS = 14
DELETED_DOMAIN = "deleted.invalid"


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 320 or not _EMAIL.match(email):
        raise UnprocessableRequest(f"{email!r} is not a valid e-mail address", param="email")
    return email


def check_new_password(password: str, *, param: str = "password") -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UnprocessableRequest(
            f"the password must be at least {MIN_PASSWORD_LENGTH} characters long", param=param,
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UnprocessableRequest(
            f"the password must be at most {MAX_PASSWORD_LENGTH} characters long", param=param,
        )


async def create_user(
    session: AsyncSession,
    email: str,
    password: str,
    *,
    catalog: Catalog,
    plan: str | None = None,
    is_admin: bool = False,
    verified: bool = True,
) -> User:
    email = normalize_email(email)
    check_new_password(password)
    plan = plan or catalog.default_plan
    if plan not in catalog.plans:
        raise UnprocessableRequest(
            f"unknown plan {plan!r}; choose one of {', '.join(catalog.plans)}", param="plan"
        )
    users = UserRepository.from_session(session)
    if await users.get_by_email(email) is not None:
        raise Conflict(f"a user with e-mail {email} already exists", code="email_taken")
    now = utcnow()
    user = User(email=email, password_hash=hash_password(password), plan_code=plan,
                is_admin=is_admin, email_verified_at=now if verified else None)
    users.add(user)
    await session.flush()
    await open_new_account(session, user_id=user.id, plan_code=plan, catalog=catalog, now=now)
    return user


# -- attempt limits ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptLimit:
    kind: str
    subject: str
    limit: int
    window: timedelta


def login_limits(settings: Settings, ip: str, email: str) -> list[AttemptLimit]:
    window = timedelta(minutes=settings.login_window_minutes)
    return [AttemptLimit("login_ip", ip, settings.login_failures_per_ip, window),
            AttemptLimit("login_account", email, settings.login_failures_per_account, window)]


def signup_limit(settings: Settings, ip: str) -> AttemptLimit:
    return AttemptLimit("signup_ip", ip, settings.signups_per_ip_per_hour, timedelta(hours=1))


def new_account_limit(settings: Settings, ip: str) -> AttemptLimit:
    return AttemptLimit("account_ip", ip, settings.accounts_per_ip_per_day, timedelta(days=1))


def reset_limit(settings: Settings, ip: str) -> AttemptLimit:
    return AttemptLimit("reset_ip", ip, settings.reset_requests_per_ip_per_hour,
                        timedelta(hours=1))


async def enforce_limits(session: AsyncSession, limits: list[AttemptLimit], now: datetime) -> None:
    """429 when any limit's window already holds ``limit`` attempts. Counted in the database,
    so every worker and instance sees the same attempts."""
    attempts = AuthAttemptRepository.from_session(session)
    for limit in limits:
        if await attempts.count_since(limit.kind, limit.subject, now - limit.window) >= limit.limit:
            seconds = int(limit.window.total_seconds())
            raise RateLimited(
                "Too many attempts; wait a while and try again.",
                code="rate_limit_exceeded",
                headers={"retry-after": str(seconds), "retry-after-ms": str(seconds * 1000)},
            )


async def check_and_count(sessionmaker: async_sessionmaker[AsyncSession],
                          limits: list[AttemptLimit], now: datetime) -> None:
    """429 when over a limit, else count this attempt, in its own short transaction: it must
    stay counted when the request that made it fails and rolls back. Call it before the
    request's own transaction has touched the database (on SQLite that one holds the write
    lock from its first statement)."""
    async with sessionmaker() as session, session.begin():
        await enforce_limits(session, limits, now)
        attempts = AuthAttemptRepository.from_session(session)
        for limit in limits:
            attempts.add(limit.kind, limit.subject, now)
        if secrets.randbelow(100) == 0:
            await attempts.delete_older_than(now - timedelta(days=2))


# -- log-in and sessions ----------------------------------------------------------------------------


@cache
def _decoy_hash() -> str:
    # Verified against when the e-mail has no account, so a miss costs what a hit costs.
    return hash_password(secrets.token_hex(16))


def _bad_credentials() -> AuthenticationFailed:
    return AuthenticationFailed("Incorrect e-mail or password.", code="invalid_credentials")


async def check_credentials(session: AsyncSession, email: str, password: str) -> User:
    """The user these credentials belong to, or 401 with the same message for every miss."""
    try:
        email = normalize_email(email)
    except UnprocessableRequest:
        verify_password(_decoy_hash(), password)
        raise _bad_credentials() from None
    user = await UserRepository.from_session(session).get_by_email(email)
    if user is None or user.deleted_at is not None or len(password) > MAX_PASSWORD_LENGTH:
        verify_password(_decoy_hash(), password[:MAX_PASSWORD_LENGTH])
        raise _bad_credentials()
    if not verify_password(user.password_hash, password):
        raise _bad_credentials()
    if user.disabled_at is not None:
        raise Forbidden("This account is disabled; contact support to have it enabled.",
                        code="account_disabled")
    if user.email_verified_at is None:
        raise Forbidden("Confirm your e-mail address first: follow the link we sent you. "
                        "Signing up again sends a new one.", code="email_not_verified")
    return user


async def open_session(session: AsyncSession, user_id: int, *, hours: int,
                       now: datetime) -> tuple[str, WebSession]:
    """A new dashboard session; returns the cookie's token (only its hash is stored)."""
    token = new_session_token()
    web_session = WebSession(token_hash=hash_session_token(token), user_id=user_id,
                             created_at=now, expires_at=now + timedelta(hours=hours))
    sessions = WebSessionRepository.from_session(session)
    sessions.add(web_session)
    await session.flush()
    if secrets.randbelow(50) == 0:
        await sessions.delete_expired(now)
    return token, web_session


async def log_in(sessionmaker: async_sessionmaker[AsyncSession], email: str, password: str, *,
                 limits: list[AttemptLimit], session_hours: int,
                 now: datetime) -> tuple[User, str]:
    """Check the credentials and open a session, in a transaction of its own so that a failure
    is counted against ``limits`` (per address and per account) and stays counted."""
    failure: DubheError | None = None
    async with sessionmaker() as session, session.begin():
        await enforce_limits(session, limits, now)
        try:
            user = await check_credentials(session, email, password)
        except (AuthenticationFailed, Forbidden) as exc:
            attempts = AuthAttemptRepository.from_session(session)
            for limit in limits:
                attempts.add(limit.kind, limit.subject, now)
            failure = exc
        else:
            token, _ = await open_session(session, user.id, hours=session_hours, now=now)
    if failure is not None:
        raise failure
    return user, token


async def close_session(session: AsyncSession, session_id: int, *, now: datetime) -> None:
    """Log out: the session ends, and so does its playground key, on every worker."""
    await ApiKeyRepository.from_session(session).revoke(now=now, web_session_id=session_id)
    await WebSessionRepository.from_session(session).delete(session_id)


# -- sign-up ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignUp:
    """What a sign-up did. ``user`` is set when the visitor may be logged in now; ``mail`` is
    the message to send (verification, or "you already have an account") when there is one."""

    user: User | None
    mail: Mail | None


@dataclass(frozen=True, slots=True)
class Mail:
    to: str
    subject: str
    body: str


async def sign_up(session: AsyncSession, *, email: str, password: str, invite: str | None,
                  settings: Settings, catalog: Catalog, ip: str, now: datetime) -> SignUp:
    mode = settings.resolved_signup_mode
    if mode == "closed":
        raise Forbidden("Sign-up is closed on this deployment; ask its operator for an account.",
                        code="signup_closed")
    email = normalize_email(email)
    check_new_password(password)
    secret = settings.resolved_secret
    if mode == "invite":
        claim = read_link(secret, invite or "", "invite", now)
        if claim is None or claim.subject != email:
            raise Forbidden("Sign-up on this deployment needs an invitation for this e-mail "
                            "address; use the link from your invitation.", code="invite_required",
                            param="invite")
    users = UserRepository.from_session(session)
    existing = await users.get_by_email(email)
    if mode == "email-verified":
        if existing is not None:
            # Same answer as a new address; the owner learns about it by e-mail.
            return SignUp(user=None, mail=Mail(
                to=email, subject="Your Dubhe account",
                body=("Someone (hopefully you) tried to sign up with this address, which already "
                      f"has an account. Log in at {settings.public_url}/login, or reset your "
                      f"password at {settings.public_url}/forgot-password.\n"),
            ))
        user = await create_user(session, email, password, catalog=catalog, verified=False)
        return SignUp(user=None, mail=verification_mail(settings, user, now))
    if existing is not None:
        raise Conflict("This e-mail address cannot be used to sign up. If it is yours, log in "
                       "or reset your password.", code="email_taken", param="email")
    if mode == "open":
        await enforce_limits(session, [new_account_limit(settings, ip)], now)
        AuthAttemptRepository.from_session(session).add("account_ip", ip, now)
    user = await create_user(session, email, password, catalog=catalog, verified=True)
    return SignUp(user=user, mail=None)


def verification_mail(settings: Settings, user: User, now: datetime) -> Mail:
    expires = int((now + timedelta(hours=VERIFY_LINK_HOURS)).timestamp())
    token = sign_link(settings.resolved_secret, LinkClaim("verify", str(user.id), user.email,
                                                          expires))
    return Mail(to=user.email, subject="Confirm your e-mail address for Dubhe", body=(
        f"Welcome to Dubhe. Confirm your address to finish signing up:\n\n"
        f"{settings.public_url}/verify-email?token={token}\n\n"
        f"The link works for {VERIFY_LINK_HOURS} hours. If you did not sign up, ignore this.\n"
    ))


async def verify_email(session: AsyncSession, token: str, *, secret: bytes,
                       now: datetime) -> User | None:
    claim = read_link(secret, token, "verify", now)
    if claim is None or not claim.subject.isdigit():
        return None
    user = await UserRepository.from_session(session).get(int(claim.subject))
    if user is None or user.deleted_at is not None or user.email != claim.fingerprint:
        return None
    if user.email_verified_at is None:
        user.email_verified_at = now
    return user


def invite_link(settings: Settings, email: str, now: datetime) -> str:
    email = normalize_email(email)
    expires = int((now + timedelta(days=INVITE_LINK_DAYS)).timestamp())
    token = sign_link(settings.resolved_secret, LinkClaim("invite", email, "", expires))
    return f"{settings.public_url}/signup?invite={token}&email={email}"


# -- passwords --------------------------------------------------------------------------------------


async def request_password_reset(session: AsyncSession, email: str, *, settings: Settings,
                                 now: datetime) -> Mail | None:
    """The reset mail to send, or None when the address has no account (the caller answers
    the same either way)."""
    try:
        email = normalize_email(email)
    except UnprocessableRequest:
        return None
    user = await UserRepository.from_session(session).get_by_email(email)
    if user is None or user.deleted_at is not None:
        return None
    expires = int((now + timedelta(hours=RESET_LINK_HOURS)).timestamp())
    token = sign_link(settings.resolved_secret, LinkClaim(
        "reset", str(user.id), password_fingerprint(user.password_hash), expires))
    return Mail(to=user.email, subject="Reset your Dubhe password", body=(
        f"Choose a new password for your Dubhe account:\n\n"
        f"{settings.public_url}/reset-password?token={token}\n\n"
        f"The link works once, for {RESET_LINK_HOURS} hour. If you did not ask for it, ignore "
        "this message: your password stays as it is.\n"
    ))


async def reset_password(session: AsyncSession, token: str, new_password: str, *,
                         secret: bytes, now: datetime) -> User:
    check_new_password(new_password)
    claim = read_link(secret, token, "reset", now)
    user = None
    if claim is not None and claim.subject.isdigit():
        user = await UserRepository.from_session(session).get(int(claim.subject))
    if (claim is None or user is None or user.deleted_at is not None
            or password_fingerprint(user.password_hash) != claim.fingerprint):
        raise Forbidden("This reset link is invalid, used or expired; ask for a new one.",
                        code="invalid_reset_link", param="token")
    user.password_hash = hash_password(new_password)
    # Whoever knew the old password is logged out everywhere. Following the link proves the
    # address, too.
    user.email_verified_at = user.email_verified_at or now
    await WebSessionRepository.from_session(session).delete_for_user(user.id)
    # The link proves the owner: a lock-out by someone guessing at the account ends here.
    await AuthAttemptRepository.from_session(session).clear("login_account", user.email)
    return user


async def change_password(session: AsyncSession, user_id: int, current: str, new: str, *,
                          keep_session: int) -> None:
    user = await UserRepository.from_session(session).get(user_id)
    if user is None or not verify_password(user.password_hash, current):
        raise Forbidden("The current password is not correct.", code="invalid_password",
                        param="current_password")
    check_new_password(new, param="new_password")
    user.password_hash = hash_password(new)
    await WebSessionRepository.from_session(session).delete_for_user(user_id, keep=keep_session)


async def delete_account(session: AsyncSession, user_id: int, password: str, *,
                         now: datetime) -> None:
    """Close an account: keys revoked (on every worker within a second), sessions ended, the
    e-mail and password scrubbed. The row, the account and its ledger stay: they are the
    record of what was paid and used."""
    user = await UserRepository.from_session(session).get(user_id)
    if user is None or not verify_password(user.password_hash, password):
        raise Forbidden("The password is not correct.", code="invalid_password", param="password")
    await ApiKeyRepository.from_session(session).revoke(now=now, user_id=user_id)
    await WebSessionRepository.from_session(session).delete_for_user(user_id)
    user.email = f"deleted-{user.id}@{DELETED_DOMAIN}"
    user.password_hash = "!deleted"
    user.is_admin = False
    user.deleted_at = now
    user.updated_at = now


# -- the first admin --------------------------------------------------------------------------------


async def ensure_first_admin(session: AsyncSession, *, settings: Settings,
                             catalog: Catalog) -> User | None:
    """From DUBHE_ADMIN_EMAIL and DUBHE_ADMIN_PASSWORD, once: only while no admin exists. An
    existing user with that address is made admin (its password is left alone)."""
    if not settings.admin_email or settings.admin_password is None:
        return None
    users = UserRepository.from_session(session)
    if await users.any_admin():
        return None
    existing = await users.get_by_email(normalize_email(settings.admin_email))
    if existing is not None:
        existing.is_admin = True
        existing.email_verified_at = existing.email_verified_at or utcnow()
        return existing
    return await create_user(session, settings.admin_email,
                             settings.admin_password.get_secret_value(), catalog=catalog,
                             is_admin=True)
