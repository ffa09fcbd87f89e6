"""Red team: a key that should be dead keeps working on one of the two workers, and the admin
console's access checks, against ``dubhe serve --workers 2`` (the web suite's server).

Each way a key dies (``dubhe keys revoke``, ``DELETE /api/keys/{id}``, an admin disabling the
account, log-out ending the playground key, closing the account) is tried on a key first used on
both workers (fresh connections land on either), then, about a second and a half later, 30
fresh connections must all be refused on /v1 and /api."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.web.conftest import (  # noqa: F401  (fixtures)
    PASSWORD,
    WebClient,
    WebServer,
    mailbox,
    new_email,
    web,
)

SPREAD = 30  # fresh connections: each lands on either worker


def _statuses(web: WebServer, key: str) -> list[int]:  # noqa: F811
    statuses = []
    for index in range(SPREAD):
        # A new client per request: a new connection, accepted by whichever worker is first.
        with httpx.Client(timeout=30) as client:
            headers = {"authorization": f"Bearer {key}"}
            if index % 2:
                response = client.post(web.base_url + "/chat/completions", headers=headers,
                                       json={"model": "dubhe-fast", "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "hi"}]})
            else:
                response = client.get(web.root + "/api/account", headers=headers)
            statuses.append(response.status_code)
    return statuses


def _dies(web: WebServer, key: str, kill: Callable[[], None]) -> None:  # noqa: F811
    assert set(_statuses(web, key)) == {200}  # warm on both workers
    kill()
    time.sleep(1.5)
    statuses = _statuses(web, key)
    assert set(statuses) == {401}, f"{statuses.count(200)} of {SPREAD} answered 200 after death"


@pytest.fixture
def account(web: WebServer) -> Iterator[tuple[str, WebClient]]:  # noqa: F811
    email = new_email("victim")
    web.cli("users", "create", email, "--password", PASSWORD, "--plan", "pro")
    with web.client() as client:
        assert client.log_in(email).status_code == 200
        yield email, client


def test_cli_revocation_reaches_both_workers(web: WebServer,  # noqa: F811
                                             account: tuple[str, WebClient]) -> None:
    email, _ = account
    key = web.cli("keys", "create", email).stdout.strip()
    _dies(web, key, lambda: web.cli("keys", "revoke", key))


def test_dashboard_revocation_reaches_both_workers(web: WebServer,  # noqa: F811
                                                   account: tuple[str, WebClient]) -> None:
    _, client = account
    created = client.create_key("doomed")
    _dies(web, created["key"],
          lambda: client.api("DELETE", f"/api/keys/{created['id']}").raise_for_status())


def test_logout_kills_the_playground_key_on_both_workers(web: WebServer,  # noqa: F811
                                                         account: tuple[str, WebClient]) -> None:
    _, client = account
    minted = client.api("POST", "/api/playground/key")
    assert minted.status_code == 201, minted.text
    _dies(web, minted.json()["key"],
          lambda: client.api("POST", "/api/auth/logout").raise_for_status())


def test_closing_the_account_kills_its_keys_on_both_workers(
        web: WebServer, account: tuple[str, WebClient]) -> None:  # noqa: F811
    _, client = account
    key = client.create_key("closing")["key"]
    _dies(web, key, lambda: client.api("POST", "/api/account/delete",
                                       {"password": PASSWORD}).raise_for_status())


def test_an_admin_disabling_the_account_kills_its_keys_on_both_workers(
        web: WebServer, account: tuple[str, WebClient]) -> None:  # noqa: F811
    email, client = account
    key = client.create_key("disabled")["key"]
    admin_email = new_email("admin")
    web.cli("users", "create", admin_email, "--password", PASSWORD, "--admin")
    with web.client() as admin:
        assert admin.log_in(admin_email).status_code == 200
        found = admin.get("/admin/api/users", params={"q": email}).json()
        user_id = next(row["id"] for row in found if row["email"] == email)
        _dies(web, key, lambda: admin.api("POST", f"/admin/api/users/{user_id}/disabled",
                                          {"disabled": True}).raise_for_status())
        # A disabled account cannot log back in and get a session (and a playground key).
        with web.client() as again:
            assert again.log_in(email).status_code != 200


def test_the_console_refuses_everyone_but_admins(web: WebServer,  # noqa: F811
                                                 account: tuple[str, WebClient]) -> None:
    email, client = account
    key = web.cli("keys", "create", email).stdout.strip()
    target = f"/admin/api/users/{secrets.randbelow(1000) + 1}/balance"
    body = {"amount_usd": "100.00", "reason": "gift", "idempotency_key": secrets.token_hex(8)}
    # A signed-in non-admin, with its CSRF token.
    assert client.api("POST", target, body).status_code == 403
    assert client.get("/admin/api/users").status_code == 403
    assert client.get("/admin").status_code in {302, 303, 403}
    # An API key (even sent as a bearer to the console).
    with httpx.Client(base_url=web.root, timeout=30) as raw:
        headers = {"authorization": f"Bearer {key}"}
        assert raw.post(target, json=body, headers=headers).status_code in {401, 403}
        assert raw.get("/admin/api/users", headers=headers).status_code in {401, 403}
    # An admin without the CSRF token (a cross-site form post).
    admin_email = new_email("admin")
    web.cli("users", "create", admin_email, "--password", PASSWORD, "--admin")
    with web.client() as admin:
        assert admin.log_in(admin_email).status_code == 200
        me = admin.get("/admin/api/users", params={"q": email}).json()
        user_id = next(row["id"] for row in me if row["email"] == email)
        forged = admin.api("POST", f"/admin/api/users/{user_id}/balance", body, csrf=False)
        assert forged.status_code == 403
        form = admin.http.post(f"/admin/api/users/{user_id}/balance", data=body)
        assert form.status_code in {403, 422}
    shown = web.cli("users", "show", email).stdout
    assert '"balance_usd": "0.00' in shown or '"balance_uusd": 0' in shown, shown
