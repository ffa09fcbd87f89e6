"""The accounts side of the web product in a real browser (Debian's Chromium, headless) against
``dubhe serve --workers 2``: sign up, create a key that then works from the ``openai`` package,
revoke it, log out and in, change the password; forms without their CSRF token are refused, and
a leaked API key cannot create a key. Screenshots of these pages go to tests/web/screenshots/."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai

from tests.web.conftest import (
    DESKTOP,
    PASSWORD,
    PHONE,
    WebServer,
    new_email,
    screenshot,
    sign_up_in_browser,
)


def _status_with(web: WebServer, key: str) -> int:
    return httpx.get(f"{web.base_url}/models", headers={"authorization": f"Bearer {key}"}).status_code


def test_a_visitor_signs_up_creates_a_key_uses_it_and_revokes_it(web: WebServer,
                                                                 new_context: Any) -> None:
    page = new_context(**DESKTOP).new_page()
    page.goto("/signup")
    screenshot(page, "signup-desktop")
    email = sign_up_in_browser(page)
    assert page.get_by_role("heading", name="API keys").is_visible()
    screenshot(page, "keys-empty-desktop")

    page.get_by_label("Name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    new_key = page.get_by_test_id("new-key")
    key = new_key.inner_text().strip()
    assert key.startswith("sk-dubhe-")
    assert page.get_by_role("button", name="Copy key").is_visible()
    row = page.get_by_role("row").filter(has_text="laptop")
    assert "Active" in row.inner_text()
    screenshot(page, "keys-new-key-desktop")

    # The key works from the official SDK...
    sdk = openai.OpenAI(base_url=web.base_url, api_key=key, max_retries=0)
    answer = sdk.chat.completions.create(model="dubhe-fast", max_tokens=8,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content

    # ...and is shown once: coming back lists it by prefix only.
    page.goto("/dashboard/keys")
    assert page.get_by_test_id("new-key").count() == 0
    assert key not in page.content()
    assert key[:13] in page.content()
    row = page.get_by_role("row").filter(has_text="laptop")

    # Revoke: every worker refuses the key within about a second (the key cache's refresh).
    with page.expect_navigation():
        row.get_by_role("button", name="Revoke").click()
    assert "Revoked" in page.get_by_role("row").filter(has_text="laptop").inner_text()
    revoked_at = time.monotonic()
    # Each worker's key cache refreshes every second. Wait for the first refusal, then give
    # the other worker its second (and a margin for this loaded 2-core box): from then on
    # every request, whichever worker takes it, is refused.
    while _status_with(web, key) != 401:
        assert time.monotonic() - revoked_at < 10, "no worker refused the revoked key"
        time.sleep(0.05)
    time.sleep(2)
    assert [_status_with(web, key) for _ in range(20)] == [401] * 20
    assert web.cli("keys", "list", email).stdout.count('"status":"revoked"') == 1


def test_log_out_log_in_and_change_password_in_the_browser(web: WebServer,
                                                            new_context: Any) -> None:
    page = new_context(**DESKTOP).new_page()
    email = sign_up_in_browser(page)
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{web.root}/")
    page.goto("/dashboard/account")
    page.wait_for_url("**/login?next=%2Fdashboard%2Faccount")
    screenshot(page, "login-desktop")

    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill("not my password")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text() == "Incorrect e-mail or password."

    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/dashboard/account")
    screenshot(page, "account-desktop")
    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password").fill("my new passphrase")
    page.get_by_role("button", name="Change password").click()
    assert "Password changed" in page.get_by_role("status").inner_text()

    with web.client() as client:
        assert client.log_in(email, PASSWORD).status_code == 401
        assert client.log_in(email, "my new passphrase").status_code == 200


def test_a_form_posted_without_its_csrf_token_is_refused(web: WebServer,
                                                         new_context: Any) -> None:
    page = new_context(**DESKTOP).new_page()
    sign_up_in_browser(page)
    # Strip the token the page rendered, as a forged cross-site form would lack it.
    page.eval_on_selector_all("input[name=csrf_token]", "inputs => inputs.forEach(i => i.remove())")
    page.get_by_label("Name").fill("forged")
    with page.expect_response(lambda r: r.url.endswith("/dashboard/keys")) as posted:
        page.get_by_role("button", name="Create key").click()
    assert posted.value.status == 403
    assert "csrf_failed" in page.content()
    page.goto("/dashboard/keys")
    assert page.get_by_role("row").filter(has_text="forged").count() == 0


def test_a_leaked_api_key_cannot_create_a_key(web: WebServer, new_context: Any) -> None:
    context = new_context(**DESKTOP)
    page = context.new_page()
    sign_up_in_browser(page)
    page.get_by_label("Name").fill("leaked")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_test_id("new-key").inner_text().strip()
    # Someone holding only the key, from another machine, with or without a CSRF token.
    with web.client() as thief:
        token = thief.csrf()
        attempts = [
            thief.http.post("/api/keys", json={"name": "mine"},
                            headers={"authorization": f"Bearer {key}", "x-csrf-token": token}),
            thief.http.post("/dashboard/keys", data={"name": "mine", "csrf_token": token},
                            headers={"authorization": f"Bearer {key}"}),
        ]
    assert [response.status_code for response in attempts] == [401, 303]
    assert attempts[1].headers["location"].startswith("/login")
    page.reload()
    assert page.get_by_role("row").filter(has_text="mine").count() == 0


def test_account_pages_at_phone_width(web: WebServer, new_context: Any) -> None:
    page = new_context(**PHONE).new_page()
    page.goto("/signup")
    screenshot(page, "signup-phone")
    page.goto("/login")
    screenshot(page, "login-phone")
    sign_up_in_browser(page, new_email("phone"))
    page.get_by_label("Name").fill("phone")
    page.get_by_role("button", name="Create key").click()
    page.get_by_test_id("new-key").wait_for()
    # Nothing is wider than the screen: tables scroll inside their own box.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "keys-phone")
    page.goto("/dashboard/account")
    screenshot(page, "account-phone")
    # Keyboard only: Tab reaches the key form's name field and Enter submits.
    page.goto("/dashboard/keys")
    page.get_by_label("Name").focus()
    page.keyboard.type("keyboard")
    page.keyboard.press("Enter")
    page.get_by_test_id("new-key").wait_for()
    assert "keyboard" in page.get_by_role("heading", name="Your new key").inner_text()
