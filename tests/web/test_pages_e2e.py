"""The dashboard in a real browser (Debian's Chromium, headless) against ``dubhe serve
--workers 2``: a visitor's whole path from sign-up to a streamed answer in the playground; every
page checked with axe-core (no serious or critical violations), at desktop and phone width, and
saved as a screenshot; and the keyboard path through the layout and a form."""

from __future__ import annotations

import re
import time
from functools import cache
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.web.conftest import DESKTOP, PHONE, WebServer, screenshot, sign_up_in_browser

AXE = ROOT / "tests" / "node" / "node_modules" / "axe-core" / "axe.min.js"
ANONYMOUS_PAGES = ["/", "/signup", "/login", "/forgot-password"]
SIGNED_IN_PAGES = ["/", "/dashboard/keys", "/dashboard/usage", "/dashboard/usage?period=previous",
                   "/dashboard/billing", "/dashboard/playground", "/dashboard/account"]
# Anything a person relying on a screen reader or a keyboard could not get past.
BLOCKING = ("serious", "critical")


@cache
def axe_source() -> str:
    if not AXE.exists():
        pytest.fail(f"{AXE} is missing: run `make test` (it installs tests/node's packages)")
    return AXE.read_text()


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on ``page`` as it is now."""
    page.add_script_tag(content=axe_source())
    found: list[dict[str, Any]] = page.evaluate("""async () => {
        const result = await axe.run(document, { resultTypes: ["violations"] });
        return result.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 5).map((n) => n.target.join(" ")) }));
    }""")
    return [violation for violation in found if violation["impact"] in BLOCKING]


def shot_name(path: str, width: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", path.strip("/").lower()).strip("-") or "home"
    return f"{slug}-{width}"


def wait_for_text(page: Any, path: str, text: str, timeout: float = 30) -> None:
    """Reload ``path`` until ``text`` is on it: usage reaches the database a moment after the
    answer (the meter writes in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        page.goto(path)
        if text in page.content():
            return
        assert time.monotonic() < deadline, f"{text!r} did not appear on {path}"
        time.sleep(0.5)


def create_key_in_browser(page: Any, name: str) -> str:
    page.goto("/dashboard/keys")
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_test_id("new-key").inner_text().strip()
    assert key.startswith("sk-dubhe-")
    return str(key)


def test_a_visitor_goes_from_sign_up_to_a_streamed_answer(web: WebServer, new_context: Any) -> None:
    page = new_context(**DESKTOP).new_page()
    sign_up_in_browser(page)
    key = create_key_in_browser(page, "laptop")

    # The key works from the openai package, and the usage page shows that request.
    sdk = openai.OpenAI(base_url=web.base_url, api_key=key, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="dubhe-fast", messages=[{"role": "user", "content": "Hello"}], max_tokens=16)
    request_id = raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content
    wait_for_text(page, "/dashboard/usage", request_id)
    row = page.get_by_test_id("recent-requests").get_by_role("row").filter(has_text=request_id)
    assert "dubhe-fast" in row.inner_text() and "200" in row.inner_text()
    assert page.locator("svg.chart rect").count() >= 1  # the day's bar

    # A redemption code raises the balance.
    code = web.cli("codes", "create", "--usd", "40").stdout.strip()
    page.goto("/dashboard/billing")
    assert page.get_by_test_id("balance").inner_text() == "$0.00"
    page.get_by_label("Redemption code").fill(code)
    page.get_by_role("button", name="Redeem").click()
    page.wait_for_url("**/dashboard/billing?notice=redeemed")
    assert page.get_by_test_id("balance").inner_text() == "$40.00"
    assert page.get_by_role("status").inner_text().startswith("The code was redeemed")

    # An upgrade paid from the balance changes /v1/models for the key.
    assert [model.id for model in sdk.models.list()] == ["dubhe-fast"]
    page.get_by_role("button", name="Upgrade to Pro").click()
    page.wait_for_url("**/dashboard/billing?notice=upgraded")
    assert page.get_by_test_id("plan").inner_text() == "Pro"
    assert page.get_by_test_id("balance").inner_text() == "$11.00"
    deadline = time.monotonic() + 5
    while "dubhe-reasoning" not in {model.id for model in sdk.models.list()}:
        assert time.monotonic() < deadline, "the upgrade did not reach /v1/models"
        time.sleep(0.1)

    # The playground streams an answer with the session's own key, and shows what it cost.
    page.goto("/dashboard/playground")
    page.get_by_label("Model").select_option("dubhe-reasoning")
    page.get_by_label("Message").fill("Say something short.")
    page.get_by_role("button", name="Send").click()
    status = page.get_by_test_id("playground-usage")
    status.filter(has_text="Done:").wait_for(timeout=30_000)
    assert re.search(r"Done: \d+ prompt \+ \d+ completion tokens, cost \$\d+\.\d{2,6}\.",
                     status.inner_text())
    assert page.get_by_test_id("playground-answer").inner_text().strip()
    screenshot(page, "playground-answer-desktop")

    # Stop ends a long stream at once (the paced upstream writes 40 tokens a second).
    page.get_by_label("Model").select_option("dubhe-code")
    page.get_by_label("Max tokens").fill("4000")
    page.get_by_label("Message").fill("A long story [[sim:tokens=4000]]")
    page.get_by_role("button", name="Send").click()
    page.get_by_test_id("playground-answer").filter(has_text=re.compile(r"\S")).wait_for()
    page.get_by_role("button", name="Stop").click()
    status.filter(has_text="Stopped").wait_for(timeout=10_000)
    assert page.get_by_role("button", name="Send").is_enabled()

    # Both playground requests were billed like any other, under the playground's key.
    wait_for_text(page, "/dashboard/usage", "Playground (this session)")
    assert "dubhe-reasoning" in page.get_by_test_id("recent-requests").inner_text()


@pytest.mark.parametrize("width", ["desktop", "phone"])
def test_every_page_passes_axe_fits_the_screen_and_is_saved(
    web: WebServer, new_context: Any, width: str,
) -> None:
    options = DESKTOP if width == "desktop" else PHONE
    problems: dict[str, Any] = {}

    def check(page: Any, path: str, name: str) -> None:
        page.goto(path)
        assert page.locator("main h1").count() == 1, f"{path} needs one h1"
        violations = axe_violations(page)
        if violations:
            problems[path] = violations
        # Nothing wider than the screen: tables scroll inside their own box.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 0:
            problems[f"{path} (width)"] = f"{overflow}px wider than the screen"
        screenshot(page, name)

    anonymous = new_context(**options).new_page()
    for path in ANONYMOUS_PAGES:
        check(anonymous, path, shot_name(path, width) + ("-anonymous" if path == "/" else ""))

    page = new_context(**options).new_page()
    sign_up_in_browser(page)
    key = create_key_in_browser(page, f"{width} key")
    screenshot(page, shot_name("/dashboard/keys-new-key", width))
    answer = httpx.post(web.base_url + "/chat/completions", timeout=30,
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": "dubhe-fast", "max_tokens": 24,
                              "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200
    wait_for_text(page, "/dashboard/usage", answer.headers["x-request-id"])
    for path in SIGNED_IN_PAGES:
        check(page, path, shot_name(path, width))

    assert not problems, problems


def test_the_layout_and_a_form_work_from_the_keyboard(web: WebServer, new_context: Any) -> None:
    page = new_context(**DESKTOP).new_page()
    sign_up_in_browser(page)
    page.goto("/dashboard/billing")

    # The first Tab reaches the skip link, visibly, and Enter moves focus to the content.
    page.keyboard.press("Tab")
    focused = page.evaluate("""() => { const e = document.activeElement; const r = e.getBoundingClientRect();
        return { text: e.textContent.trim(), top: r.top, outline: getComputedStyle(e).outlineStyle }; }""")
    assert focused["text"] == "Skip to content"
    assert focused["top"] >= 0 and focused["outline"] != "none"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"

    # From there, Tab order reaches the code field; typing and Enter redeem it.
    code = web.cli("codes", "create", "--usd", "5").stdout.strip()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "redemption-code":
            break
    else:
        pytest.fail("Tab never reached the Redemption code field")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.type(code)
    page.keyboard.press("Enter")
    page.wait_for_url("**/dashboard/billing?notice=redeemed")
    assert page.get_by_test_id("balance").inner_text() == "$5.00"
