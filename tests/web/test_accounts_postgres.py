"""The accounts' storage on PostgreSQL: sessions, attempt counting, keys and deletion run the same
against a fresh PostgreSQL database as on SQLite (the rest of tests/web runs on SQLite)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Sim, fresh_database
from tests.web.conftest import PASSWORD, Mailbox, WebServer, link_in, start_web_server
from tests.web.test_accounts_api import bearer, wait_for_status


@pytest.fixture(scope="module")
def pg_web(sims: dict[str, Sim], mailbox: Mailbox,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    tmp = tmp_path_factory.mktemp("pgweb")
    with fresh_database("postgresql", tmp) as url:
        server = start_web_server(tmp, url, sims, workers=2, DUBHE_SIGNUP_MODE="open",
                                  DUBHE_SMTP_URL=mailbox.url)
        try:
            yield WebServer(server, server.base_url.removesuffix("/v1"))
        finally:
            server.running.stop()


def test_accounts_sessions_and_keys_on_postgresql(pg_web: WebServer, mailbox: Mailbox) -> None:
    with pg_web.client() as client:
        email = client.sign_up()
        key = client.create_key("pg", expires_in_days=7)
        models = f"{pg_web.base_url}/models"
        assert httpx.get(models, headers=bearer(key["key"])).status_code == 200
        listed = client.get("/api/keys").json()["data"]
        assert listed[0]["status"] == "active"
        assert client.api("DELETE", f"/api/keys/{key['id']}").status_code == 200
        assert wait_for_status(models, key["key"], 401) == 401
        assert client.api("POST", "/api/auth/logout").status_code == 200
        assert client.get("/api/account/me").status_code == 401

    for _ in range(10):
        with pg_web.client() as guesser:
            assert guesser.log_in(email, "wrong password!").status_code == 401
    with pg_web.client() as guesser:
        assert guesser.log_in(email).status_code == 429

    with pg_web.client() as forgetful:
        assert forgetful.api("POST", "/api/auth/password-reset", {"email": email}).status_code == 202
        token = link_in(mailbox.wait_for(email, "Reset"), "/reset-password").split("token=", 1)[1]
        done = forgetful.api("POST", "/api/auth/password-reset/confirm",
                             {"token": token, "password": "a fresh passphrase"})
        assert done.status_code == 200
        # Following the e-mailed link proves the owner and ends the lock-out the guesser caused.
        assert forgetful.log_in(email, "a fresh passphrase").status_code == 200
        assert forgetful.log_in(email, PASSWORD).status_code == 401


def test_deleting_an_account_on_postgresql(pg_web: WebServer) -> None:
    with pg_web.client() as client:
        email = client.sign_up()
        key = client.create_key("doomed")["key"]
        assert client.api("POST", "/api/account/delete", {"password": PASSWORD}).status_code == 200
        assert wait_for_status(f"{pg_web.base_url}/models", key, 401) == 401
    with pg_web.client() as again:
        assert again.log_in(email).status_code == 401
        # The address is free again, and the new account is a new account.
        assert again.sign_up(email) == email
        assert again.get("/api/keys").json()["data"] == []
