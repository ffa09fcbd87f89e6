"""The admin console's API (``/admin/api``) and pages over HTTP against ``dubhe serve --workers
2``: who may call what (every route, read from the app's route table), and each action end to
end, seen by the rest of the product (``/v1``, the user's statement, the key cache), on every
worker, with its audit entry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.admin.conftest import PASSWORD, WebClient, WebServer
from tests.web.test_accounts_api import bearer, error_of
from tests.web.test_isolation import ROUTES, concrete

ADMIN_ROUTES = [(method, path) for method, path in ROUTES if path.startswith("/admin")]
CHAT = {"model": "dubhe-fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def test_the_route_table_has_the_console() -> None:
    paths = {path for _, path in ADMIN_ROUTES}
    for expected in ("/admin", "/admin/users", "/admin/users/{user_id}", "/admin/models",
                     "/admin/upstreams", "/admin/codes", "/admin/inbox", "/admin/audit",
                     "/admin/api/users/{user_id}/balance", "/admin/api/models/{model_id}/maintenance",
                     "/admin/api/inbox/{conversation_id}/messages", "/admin/api/totals"):
        assert expected in paths


@pytest.fixture(scope="module")
def outsider(web: WebServer) -> Iterator[tuple[WebClient, str]]:
    """A signed-in user who is not an admin, and their API key."""
    with web.client() as user:
        user.sign_up()
        yield user, user.create_key("mine")["key"]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_a_user_who_is_not_an_admin_gets_403_everywhere(
        web: WebServer, outsider: tuple[WebClient, str], method: str, path: str) -> None:
    user, key = outsider
    url = concrete(path, {})
    response = user.api(method, url, json={"plan": "ultimate", "amount_usd": "100",
                                           "reason": "x", "idempotency_key": "abcdefgh"})
    assert response.status_code == 403, response.text
    assert error_of(response)["code"] == "admin_required"
    # An API key never reaches the console: /admin/api says a session is needed, pages send
    # the caller to log in.
    by_key = httpx.request(method, f"{web.root}{url}", headers=bearer(key), json={},
                           follow_redirects=False)
    if path.startswith("/admin/api"):
        assert by_key.status_code == 401, by_key.text
        assert error_of(by_key)["code"] == "session_required"
    else:
        assert by_key.status_code == 303, by_key.text


def user_id_of(client: WebClient) -> int:
    return int(client.get("/api/account/me").json()["id"])


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Poll ``check()`` until it returns something truthy (the key cache and the maintenance
    switch refresh within a second; the deadline only bounds a failure on a loaded box)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_maintenance_turns_v1_into_503_on_every_worker_and_back(web: WebServer,
                                                                 admin: WebClient) -> None:
    with web.client() as user:
        user.sign_up()
        key = user.create_key()["key"]
    chat = f"{web.base_url}/chat/completions"
    assert httpx.post(chat, headers=bearer(key), json=CHAT).status_code == 200

    switched = admin.api("POST", "/admin/api/models/dubhe-fast/maintenance",
                         {"maintenance": True})
    assert switched.status_code == 200, switched.text
    try:
        assert wait_for(lambda: httpx.post(chat, headers=bearer(key), json=CHAT).status_code
                        == 503)
        # From then on every worker refuses (new connections land on either), once the other
        # worker's board has refreshed too: a second after its last refresh ended, which may
        # have begun just before the switch.
        time.sleep(1.5)
        for _ in range(6):
            refused = httpx.post(chat, headers=bearer(key), json=CHAT)
            assert refused.status_code == 503
            assert error_of(refused)["code"] == "model_maintenance"
            assert refused.headers["retry-after"]
        models = httpx.get(f"{web.base_url}/models", headers=bearer(key)).json()["data"]
        assert {m["id"]: m["status"] for m in models}["dubhe-fast"] == "maintenance"
        listed = admin.get("/admin/api/models").json()
        assert {m["id"]: m["status"] for m in listed}["dubhe-fast"] == "maintenance"
    finally:
        assert admin.api("POST", "/admin/api/models/dubhe-fast/maintenance",
                         {"maintenance": False}).status_code == 200
    assert wait_for(lambda: httpx.post(chat, headers=bearer(key), json=CHAT).status_code == 200)
    audit = admin.get("/admin/api/audit").json()
    assert [(e["action"], e["target"], e["detail"]) for e in audit[:2]] == [
        ("model.maintenance", "dubhe-fast", "off"), ("model.maintenance", "dubhe-fast", "on")]
    assert admin.api("POST", "/admin/api/models/no-such-model/maintenance",
                     {"maintenance": True}).status_code == 404


def test_the_cli_switches_maintenance_too(web: WebServer, admin: WebClient) -> None:
    web.cli("models", "maintenance", "dubhe-vision", "on")
    try:
        listed = admin.get("/admin/api/models").json()
        assert {m["id"]: m["status"] for m in listed}["dubhe-vision"] == "maintenance"
    finally:
        web.cli("models", "maintenance", "dubhe-vision", "off")
    assert admin.get("/admin/api/audit").json()[0]["admin"] == "operator (command line)"
    failed = web.cli("models", "maintenance", "no-such-model", "on", check=False)
    assert failed.returncode != 0


def test_a_balance_adjustment_lands_once_in_the_statement_with_its_reason(
        web: WebServer, admin: WebClient) -> None:
    with web.client() as user:
        email = user.sign_up()
        user_id = user_id_of(user)
        adjust = f"/admin/api/users/{user_id}/balance"
        body = {"amount_usd": "7.25", "reason": "goodwill for ticket 42",
                "idempotency_key": "ticket42-credit"}
        assert admin.api("POST", adjust, body).json() == {"applied": True}
        # The same key again (a double click, a retry): nothing more.
        assert admin.api("POST", adjust, body).json() == {"applied": False}
        # The same key for another user is that user's own adjustment, not a duplicate.
        with web.client() as other:
            other.sign_up()
            other_adjust = f"/admin/api/users/{user_id_of(other)}/balance"
            assert admin.api("POST", other_adjust, body).json() == {"applied": True}
            assert other.get("/api/account").json()["balance_usd"] in ("7.25", "7.250000")
        taken = admin.api("POST", adjust, {"amount_usd": "-2", "reason": "correction",
                                           "idempotency_key": "ticket42-debit"})
        assert taken.json() == {"applied": True}
        lines = user.get("/api/billing/statement").json()["data"]
        texts = [line["description"] for line in lines]
        assert "adjustment by support: goodwill for ticket 42" in texts
        assert "adjustment by support: correction" in texts
        assert user.get("/api/account").json()["balance_usd"] in ("5.25", "5.250000")
        # A reason is required; amounts are exact decimals, not zero.
        for bad in ({"amount_usd": "1", "reason": "  ", "idempotency_key": "k-no-reason"},
                    {"amount_usd": "0", "reason": "x", "idempotency_key": "k-zero"},
                    {"amount_usd": "1e3", "reason": "x", "idempotency_key": "k-exp"}):
            refused = admin.api("POST", adjust, bad)
            assert refused.status_code == 422, refused.text
        audit = admin.get("/admin/api/audit").json()
        assert any(e["action"] == "user.balance" and e["target"] == email
                   and "goodwill" in e["detail"] for e in audit)


def test_a_disabled_users_keys_and_log_in_stop_and_come_back(web: WebServer,
                                                             admin: WebClient) -> None:
    with web.client() as user:
        email = user.sign_up()
        user_id = user_id_of(user)
        key = user.create_key()["key"]
        models = f"{web.base_url}/models"
        assert httpx.get(models, headers=bearer(key)).status_code == 200
        assert admin.api("POST", f"/admin/api/users/{user_id}/disabled",
                         {"disabled": True}).status_code == 200
        assert wait_for(lambda: httpx.get(models, headers=bearer(key)).status_code == 401)
        # The other worker's key cache refreshes a second after its last refresh ended, which
        # may have begun just before the change (a 200 here once, in CI, after 1.0 s).
        time.sleep(1.5)
        assert all(httpx.get(models, headers=bearer(key)).status_code == 401 for _ in range(6))
        # The session ended, and logging in again is refused.
        assert user.get("/api/account/me").status_code == 401
        assert user.log_in(email).status_code == 403
        assert admin.api("POST", f"/admin/api/users/{user_id}/disabled",
                         {"disabled": False}).status_code == 200
        assert wait_for(lambda: httpx.get(models, headers=bearer(key)).status_code == 200)
        assert user.log_in(email).status_code == 200


def test_users_search_plan_and_password_reset(web: WebServer, admin: WebClient) -> None:
    with web.client() as user:
        email = user.sign_up()
        user_id = user_id_of(user)
    found = admin.get("/admin/api/users", params={"q": email.split("@")[0]}).json()
    assert [row["email"] for row in found] == [email]
    assert admin.api("POST", f"/admin/api/users/{user_id}/plan", {"plan": "pro"}).status_code \
        == 200
    assert admin.get(f"/admin/api/users/{user_id}").json()["plan"] == "pro"
    assert admin.api("POST", f"/admin/api/users/{user_id}/plan",
                     {"plan": "platinum"}).status_code == 422
    reset = admin.api("POST", f"/admin/api/users/{user_id}/password-reset")
    assert reset.status_code == 200, reset.text
    assert admin.get("/admin/api/users/999999999").status_code == 404
    page = admin.get(f"/admin/users/{user_id}")
    assert page.status_code == 200 and email in page.text


def test_codes_mint_list_revoke(web: WebServer, admin: WebClient) -> None:
    minted = admin.api("POST", "/admin/api/codes", {"amount_usd": "3", "count": 2})
    assert minted.status_code == 201, minted.text
    first, second = minted.json()["codes"]
    listed = admin.get("/admin/api/codes").json()
    newest = sorted((row for row in listed), key=lambda row: -row["id"])[:2]
    assert {row["status"] for row in newest} == {"unused"}
    revoked_id = max(row["id"] for row in newest)  # the second code minted
    assert admin.api("POST", f"/admin/api/codes/{revoked_id}/revoke").status_code == 200
    assert admin.api("POST", f"/admin/api/codes/{revoked_id}/revoke").status_code == 409
    with web.client() as user:
        user.sign_up()
        redeemed = [user.api("POST", "/api/redeem", {"code": code}).status_code
                    for code in (first, second)]
    # One of the two was revoked: it is "not valid", the other credits.
    assert sorted(redeemed) == [200, 404]


def test_upstreams_totals_and_pages_answer(web: WebServer, admin: WebClient) -> None:
    upstreams = admin.get("/admin/api/upstreams").json()
    assert {u["name"] for u in upstreams} == {"fast", "paced", "dead"}
    with web.client() as user:
        user.sign_up()
        key = user.create_key()["key"]
    # The dead upstream: its error is listed on the upstreams page.
    failed = httpx.post(f"{web.base_url}/chat/completions", headers=bearer(key),
                        json={**CHAT, "model": "dubhe-qwen"})
    assert failed.status_code in (404, 502), failed.text
    if failed.status_code == 502:
        request_id = failed.headers["x-request-id"]
        assert wait_for(lambda: any(
            error["request_id"] == request_id
            for u in admin.get("/admin/api/upstreams").json() if u["name"] == "dead"
            for error in u["last_errors"]))
    assert admin.get("/admin/api/totals").status_code == 200
    for page in ("/admin", "/admin/users", "/admin/models", "/admin/upstreams", "/admin/codes",
                 "/admin/inbox", "/admin/audit"):
        assert admin.get(page).status_code == 200, page


def test_an_admin_password_reset_link_works_once(web: WebServer, admin: WebClient) -> None:
    with web.client() as user:
        email = user.sign_up(password=PASSWORD)
        user_id = user_id_of(user)
    answer = admin.api("POST", f"/admin/api/users/{user_id}/password-reset").json()
    assert "e-mailed" in answer["message"] and email in answer["message"]
