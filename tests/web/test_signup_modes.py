"""Sign-up modes and the first admin.

``email-verified`` runs end to end against its own server and the mail sink: nothing can be used
until the e-mailed link is followed, and the answer never says whether an address was new.
``invite``, ``closed`` and the first admin from the environment are checked on the account
service over a real database (SQLite and PostgreSQL), the way ``dubhe serve`` calls it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.accounts import service
from dubhe.catalog import load_catalog
from dubhe.database import create_engine, create_sessionmaker
from dubhe.errors import Conflict, Forbidden
from dubhe.migrations import upgrade
from dubhe.models.base import utcnow
from dubhe.settings import Secret, Settings
from tests.conftest import Sim, fresh_database
from tests.web.conftest import (
    PASSWORD,
    Mailbox,
    WebServer,
    link_in,
    new_email,
    start_web_server,
)

ADMIN_EMAIL = "boss@example.com"
ADMIN_PASSWORD = "the boss's passphrase"

# -- email-verified, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def verified_web(sims: dict[str, Sim], mailbox: Mailbox,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """Mail configured and no mode set: the default is email-verified."""
    tmp = tmp_path_factory.mktemp("verified")
    with fresh_database("sqlite", tmp) as url:
        server = start_web_server(tmp, url, sims, workers=1, DUBHE_SMTP_URL=mailbox.url,
                                  DUBHE_ADMIN_EMAIL=ADMIN_EMAIL, DUBHE_ADMIN_PASSWORD=ADMIN_PASSWORD)
        try:
            yield WebServer(server, server.base_url.removesuffix("/v1"))
        finally:
            server.running.stop()


def test_email_verified_sign_up_needs_the_link_and_never_says_who_exists(
        verified_web: WebServer, mailbox: Mailbox) -> None:
    email = new_email("verify")
    with verified_web.client() as visitor:
        assert visitor.get("/api/auth/session").json()["signup_mode"] == "email-verified"
        first = visitor.api("POST", "/api/auth/signup", {"email": email, "password": PASSWORD})
        assert first.status_code == 201 and first.json()["status"] == "check_email"
        assert "dubhe_session" not in first.headers.get("set-cookie", "")
        # Not usable yet: no log-in, so no key, so the default plan's tokens cannot be used.
        refused = visitor.log_in(email)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "email_not_verified"
        # The same address again: the same answer; its owner is told by e-mail instead.
        again = visitor.api("POST", "/api/auth/signup", {"email": email, "password": "other pass"})
        assert again.status_code == 201 and again.json() == first.json()

        link = link_in(mailbox.wait_for(email, "Confirm"), "/verify-email")
        token = link.split("token=", 1)[1]
        forged = visitor.get(f"/verify-email?token={token[:-2]}00")
        assert forged.status_code == 400
        confirmed = visitor.get(f"/verify-email?token={token}")
        assert confirmed.status_code == 200 and "confirmed" in confirmed.text
        assert visitor.log_in(email).status_code == 200
        assert visitor.create_key("verified")["key"].startswith("sk-dubhe-")
    mailbox.wait_for(email, "Your Dubhe account")  # the "already has an account" note


# -- invite, closed, the first admin: the service over a real database --------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the newest schema (made outside the event loop: migrations run
    their own)."""
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        yield url


@asynccontextmanager
async def transaction(url: str) -> AsyncIterator[AsyncSession]:
    engine = create_engine(url)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


def settings_for(tmp_path: Path, **fields: object) -> Settings:
    fields.setdefault("secret_key", Secret("s" * 40))
    return Settings(data_dir=tmp_path, **fields)  # type: ignore[arg-type]


CATALOG = load_catalog(None)


async def test_invite_mode_needs_an_invitation_for_that_address(db_url: str,
                                                                tmp_path: Path) -> None:
    async with transaction(db_url) as db_session:
        settings = settings_for(tmp_path, signup_mode="invite")
        invited = new_email("invited")
        link = service.invite_link(settings, invited, utcnow())
        token = link.split("invite=", 1)[1].split("&", 1)[0]
        with pytest.raises(Forbidden) as missing:
            await service.sign_up(db_session, email=invited, password=PASSWORD, invite=None,
                                  settings=settings, catalog=CATALOG, ip="10.0.0.1", now=utcnow())
        assert missing.value.code == "invite_required"
        with pytest.raises(Forbidden):  # someone else's invitation
            await service.sign_up(db_session, email=new_email("gatecrasher"), password=PASSWORD,
                                  invite=token, settings=settings, catalog=CATALOG, ip="10.0.0.1",
                                  now=utcnow())
        other_secret = settings_for(tmp_path, signup_mode="invite", secret_key=Secret("t" * 40))
        forged = service.invite_link(other_secret, invited, utcnow()).split("invite=", 1)[1]
        with pytest.raises(Forbidden):  # signed with another deployment's secret
            await service.sign_up(db_session, email=invited, password=PASSWORD,
                                  invite=forged.split("&", 1)[0], settings=settings, catalog=CATALOG,
                                  ip="10.0.0.1", now=utcnow())
        made = await service.sign_up(db_session, email=invited, password=PASSWORD, invite=token,
                                     settings=settings, catalog=CATALOG, ip="10.0.0.1", now=utcnow())
        assert made.user is not None and made.user.plan_code == CATALOG.default_plan
        with pytest.raises(Conflict):  # the invitation does not make a second account
            await service.sign_up(db_session, email=invited, password=PASSWORD, invite=token,
                                  settings=settings, catalog=CATALOG, ip="10.0.0.1", now=utcnow())


async def test_closed_mode_makes_no_accounts(db_url: str, tmp_path: Path) -> None:
    async with transaction(db_url) as db_session:
        settings = settings_for(tmp_path, signup_mode="closed")
        with pytest.raises(Forbidden) as closed:
            await service.sign_up(db_session, email=new_email(), password=PASSWORD, invite=None,
                                  settings=settings, catalog=CATALOG, ip="10.0.0.1", now=utcnow())
        assert closed.value.code == "signup_closed"


def test_the_default_mode_follows_whether_mail_is_configured(tmp_path: Path) -> None:
    assert settings_for(tmp_path).resolved_signup_mode == "open"
    assert settings_for(tmp_path, smtp_url=Secret("smtp://127.0.0.1:25")
                        ).resolved_signup_mode == "email-verified"
    assert settings_for(tmp_path, smtp_url=Secret("smtp://127.0.0.1:25"), signup_mode="closed"
                        ).resolved_signup_mode == "closed"


async def test_the_first_admin_comes_from_the_environment_once(db_url: str,
                                                                tmp_path: Path) -> None:
    async with transaction(db_url) as db_session:
        nothing = await service.ensure_first_admin(db_session, settings=settings_for(tmp_path),
                                                   catalog=CATALOG)
        assert nothing is None  # no default credentials
        settings = settings_for(tmp_path, admin_email="Root@Example.com",
                                admin_password=Secret("an admin passphrase"))
        admin = await service.ensure_first_admin(db_session, settings=settings, catalog=CATALOG)
        assert admin is not None and admin.is_admin and admin.email == "root@example.com"
        user = await service.check_credentials(db_session, "root@example.com", "an admin passphrase")
        assert user.id == admin.id
        # An admin exists now: changing the variables later creates nobody.
        later = settings_for(tmp_path, admin_email="second@example.com",
                             admin_password=Secret("another passphrase"))
        assert await service.ensure_first_admin(db_session, settings=later, catalog=CATALOG) is None


def test_dubhe_serve_creates_the_first_admin_from_the_environment(
        verified_web: WebServer) -> None:
    with verified_web.client() as client:
        me = client.log_in(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert me.status_code == 200 and me.json()["is_admin"] is True


def test_the_cli_makes_admins_who_can_log_in(web: WebServer) -> None:
    email = new_email("admin")
    web.cli("users", "create", email, "--password", PASSWORD, "--admin")
    with web.client() as client:
        me = client.log_in(email)
        assert me.status_code == 200 and me.json()["is_admin"] is True
    assert httpx.get(f"{web.root}/healthz").status_code == 200
