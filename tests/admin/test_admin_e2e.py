"""The help chat and the admin console in a real browser (Debian's Chromium, headless) against
``dubhe serve --workers 2``: a visitor and an admin, in two browser contexts connected to
different workers, chat live; maintenance, a balance adjustment and disabling a user, each done
in the console and seen by the rest of the product; every console page and the chat panel
checked with axe-core and saved as screenshots at desktop and phone width."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.admin.conftest import PASSWORD, WebServer
from tests.web.conftest import DESKTOP, PHONE, screenshot, sign_up_in_browser
from tests.web.test_pages_e2e import axe_violations, create_key_in_browser

CHAT = {"model": "dubhe-fast", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def log_in_in_browser(page: Any, email: str) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/dashboard/**")


def open_chat(page: Any) -> Any:
    page.get_by_role("button", name="Help chat").click()
    return page.get_by_test_id("chat-messages")


def send_in_chat(page: Any, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def stream_worker(page: Any, test_id: str) -> str:
    """Which worker serves this page's live stream (its first event says so)."""
    locator = page.locator(f'[data-testid="{test_id}"][data-worker]')
    locator.wait_for()
    return str(locator.get_attribute("data-worker"))


def until(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_visitor_and_admin_chat_live_across_workers(web: WebServer, new_context: Any,
                                                    admin_email: str) -> None:
    visitor = new_context(**DESKTOP).new_page()
    visitor.goto("/")
    messages = open_chat(visitor)
    send_in_chat(visitor, "Hello, is anyone there?")
    messages.get_by_text("Hello, is anyone there?").wait_for()
    visitor_worker = stream_worker(visitor, "chat-messages")
    conversation_id = visitor.evaluate(
        "fetch('/api/chat').then((r) => r.json()).then((d) => d.conversation_id)")

    # The admin, in another browser profile; new profiles until its stream is on the other
    # worker (which worker takes a connection is the kernel's choice).
    for _ in range(20):
        context = new_context(**DESKTOP)
        admin = context.new_page()
        log_in_in_browser(admin, admin_email)
        admin.goto("/admin/inbox")
        admin.get_by_role("link", name=f"Visitor #{conversation_id}", exact=False).click()
        admin.wait_for_url(f"**/admin/inbox/{conversation_id}")
        if stream_worker(admin, "conversation-messages") != visitor_worker:
            break
        context.close()
    else:
        pytest.fail("every admin stream landed on the visitor's worker")
    admin.get_by_test_id("conversation-messages").get_by_text("Hello, is anyone there?").wait_for()

    # The admin's reply appears in the visitor's open panel without a reload...
    admin.get_by_label("Reply").fill("Yes! How can we help?")
    admin.get_by_role("button", name="Send reply").click()
    messages.get_by_text("Yes! How can we help?").wait_for(timeout=10_000)
    # ...and the visitor's next message in the admin's open page.
    send_in_chat(visitor, "<b>not bold</b> please")
    admin.get_by_test_id("conversation-messages").get_by_text("<b>not bold</b> please").wait_for(
        timeout=10_000)
    assert visitor.locator('[data-testid="chat-messages"] b').count() == 0  # text, not HTML
    screenshot(visitor, "chat-panel-desktop")
    screenshot(admin, "admin-conversation-desktop")

    # Both persist across a reload.
    visitor.reload()
    messages = open_chat(visitor)
    messages.get_by_text("Yes! How can we help?").wait_for()
    assert messages.get_by_text("Hello, is anyone there?").count() == 1


def test_maintenance_switched_in_the_console(web: WebServer, new_context: Any,
                                            admin_email: str) -> None:
    with web.client() as user:
        user.sign_up()
        key = user.create_key()["key"]
    chat = f"{web.base_url}/chat/completions"

    def status() -> int:
        return httpx.post(chat, headers={"authorization": f"Bearer {key}"}, json=CHAT,
                          timeout=30).status_code

    assert status() == 200
    admin = new_context(**DESKTOP).new_page()
    log_in_in_browser(admin, admin_email)
    admin.goto("/admin/models")
    admin.get_by_role("button", name="Start maintenance of dubhe-fast").click()
    try:
        admin.get_by_role("button", name="End maintenance of dubhe-fast").wait_for()
        assert until(lambda: status() == 503)
        admin.get_by_role("button", name="End maintenance of dubhe-fast").click()
        admin.get_by_role("button", name="Start maintenance of dubhe-fast").wait_for()
    finally:
        web.cli("models", "maintenance", "dubhe-fast", "off")
    assert until(lambda: status() == 200)


def test_balance_adjustment_and_disabling_in_the_console(web: WebServer, new_context: Any,
                                                         admin_email: str) -> None:
    user = new_context(**DESKTOP).new_page()
    email = sign_up_in_browser(user)
    key = create_key_in_browser(user, "to be disabled")
    models = f"{web.base_url}/models"

    admin = new_context(**DESKTOP).new_page()
    log_in_in_browser(admin, admin_email)
    admin.goto("/admin/users")
    admin.get_by_label("Search by e-mail").fill(email)
    admin.get_by_role("button", name="Search").click()
    admin.get_by_role("link", name=email).click()
    admin.get_by_label("Amount (USD)").fill("4.50")
    admin.get_by_label("Reason").fill("credit for the outage of May 3")
    admin.get_by_role("button", name="Adjust balance").click()
    admin.get_by_test_id("admin-balance").filter(has_text="4.50").wait_for()

    user.goto("/dashboard/billing")
    assert "credit for the outage of May 3" in user.content()
    assert "4.50" in user.get_by_test_id("balance").inner_text()

    assert httpx.get(models, headers={"authorization": f"Bearer {key}"}).status_code == 200
    admin.get_by_role("button", name="Disable account").click()
    admin.get_by_role("button", name="Enable account").wait_for()
    assert until(lambda: httpx.get(models, headers={"authorization": f"Bearer {key}"}
                                   ).status_code == 401)
    admin.goto("/admin/audit")
    audit = admin.get_by_test_id("audit").inner_text()
    assert "user.disable" in audit and "user.balance" in audit and email in audit


@pytest.mark.parametrize("width", ["desktop", "phone"])
def test_every_console_page_passes_axe_and_is_saved(web: WebServer, new_context: Any,
                                                   admin_email: str, width: str) -> None:
    options = DESKTOP if width == "desktop" else PHONE
    visitor = new_context(**options).new_page()
    visitor.goto("/")
    open_chat(visitor)
    send_in_chat(visitor, f"A question from a {width} screen")
    visitor.get_by_test_id("chat-messages").get_by_text(
        f"A question from a {width} screen").wait_for()
    problems: dict[str, Any] = {}
    violations = axe_violations(visitor)
    if violations:
        problems["chat panel"] = violations
    screenshot(visitor, f"chat-panel-{width}")
    conversation_id = visitor.evaluate(
        "fetch('/api/chat').then((r) => r.json()).then((d) => d.conversation_id)")

    page = new_context(**options).new_page()
    log_in_in_browser(page, admin_email)
    user_id = page.evaluate("fetch('/api/account/me').then((r) => r.json()).then((d) => d.id)")
    for path in ("/admin", "/admin/users", f"/admin/users/{user_id}", "/admin/models",
                 "/admin/upstreams", "/admin/codes", "/admin/inbox",
                 f"/admin/inbox/{conversation_id}", "/admin/audit"):
        page.goto(path)
        assert page.locator("main h1").count() == 1, f"{path} needs one h1"
        violations = axe_violations(page)
        if violations:
            problems[path] = violations
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 0:
            problems[f"{path} (width)"] = f"{overflow}px wider than the screen"
        name = path.strip("/").replace("/", "-").replace("admin-inbox-", "admin-conversation-")
        name = name.replace(f"users-{user_id}", "user")
        screenshot(page, f"{name}-{width}")
    assert not problems, problems
