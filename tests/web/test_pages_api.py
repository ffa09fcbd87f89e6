"""The dashboard's pages and their /api twins over HTTP against ``dubhe serve --workers 2``:
plan changes that need a session and its CSRF token, redemption by form, usage and the statement
in JSON, HTML and CSV, cached static assets, and a homepage built from the operator's own
dubhe.toml whose code examples run as printed. Browser-level checks are in test_pages_e2e.py."""

from __future__ import annotations

import csv
import html
import io
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import (
    BIN,
    ROOT,
    Server,
    Sim,
    assert_clean_log,
    free_port,
    start_process,
    wait_until_up,
)
from tests.web.conftest import WebClient, WebServer

NODE_DIR = ROOT / "tests" / "node"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def error_code(response: httpx.Response) -> object:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert response.headers.get("x-request-id")
    return body["error"]["code"]


def mint_code(web: WebServer, usd: str) -> str:
    return str(web.cli("codes", "create", "--usd", usd).stdout.strip())


def balance_on_page(client: WebClient) -> str:
    page = client.get("/dashboard/billing")
    assert page.status_code == 200, page.text
    match = re.search(r'data-testid="balance">([^<]+)<', page.text)
    assert match, page.text
    return match.group(1)


def visible_models(web: WebServer, key: str) -> set[str]:
    response = httpx.get(web.base_url + "/models", headers=bearer(key), timeout=30)
    assert response.status_code == 200, response.text
    return {model["id"] for model in response.json()["data"]}


def wait_until(check: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)


# -- attacks first --------------------------------------------------------------------------------


def test_a_leaked_key_cannot_change_the_plan_and_forms_need_their_csrf_token(
    web: WebServer,
) -> None:
    with web.client() as owner:
        owner.sign_up()
        key = owner.create_key("laptop")["key"]
        assert owner.form("/dashboard/billing/redeem", {"code": mint_code(web, "40")}).status_code == 303

        with_key = httpx.post(web.root + "/api/billing/plan", json={"plan": "pro"},
                              headers=bearer(key))
        json_without_token = owner.api("POST", "/api/billing/plan", {"plan": "pro"}, csrf=False)
        form_without_token = owner.form("/dashboard/billing/plan", {"plan": "pro"}, csrf=False)
        # A token from another browser (its own CSRF cookie) does not fit this one's cookie.
        with web.client() as stranger:
            foreign = stranger.csrf()
        form_with_foreign_token = owner.http.post("/dashboard/billing/plan",
                                                  data={"plan": "pro", "csrf_token": foreign})

        assert (with_key.status_code, error_code(with_key)) == (401, "session_required")
        assert (json_without_token.status_code, error_code(json_without_token)) == (403, "csrf_failed")
        assert form_without_token.status_code == 403
        assert form_with_foreign_token.status_code == 403
        # None of them bought anything.
        assert balance_on_page(owner) == "$40.00"
        assert visible_models(web, key) == {"dubhe-fast"}


def test_redeeming_a_code_by_form_raises_the_balance_once(web: WebServer) -> None:
    code = mint_code(web, "12.5")
    with web.client() as client:
        client.sign_up()
        assert balance_on_page(client) == "$0.00"
        refused = client.form("/dashboard/billing/redeem", {"code": code}, csrf=False)
        assert refused.status_code == 403
        assert balance_on_page(client) == "$0.00"

        redeemed = client.form("/dashboard/billing/redeem", {"code": code})
        assert redeemed.status_code == 303
        assert redeemed.headers["location"] == "/dashboard/billing?notice=redeemed"
        assert balance_on_page(client) == "$12.50"

        again = client.form("/dashboard/billing/redeem", {"code": code})
        assert again.status_code == 409
        assert "already been redeemed" in html.unescape(again.text)
        wrong = client.form("/dashboard/billing/redeem", {"code": "DUBHE-0000-0000-0000-0000"})
        assert wrong.status_code == 404
        assert balance_on_page(client) == "$12.50"


def test_the_billing_page_shows_only_fixed_notices(web: WebServer) -> None:
    with web.client() as client:
        client.sign_up()
        crafted = client.get("/dashboard/billing", params={"notice": "<b>Send $100 to x</b>",
                                                           "error": "Your card was stolen"})
        assert crafted.status_code == 200
        assert "Send $100" not in crafted.text and "stolen" not in crafted.text
        known = client.get("/dashboard/billing", params={"notice": "redeemed"})
        assert "added to your balance" in known.text


# -- plans ----------------------------------------------------------------------------------------


def test_an_upgrade_paid_from_the_balance_changes_v1_models(web: WebServer) -> None:
    with web.client() as client:
        client.sign_up()
        key = client.create_key("sdk")["key"]
        too_poor = client.api("POST", "/api/billing/plan", {"plan": "pro"})
        assert (too_poor.status_code, error_code(too_poor)) == (402, "insufficient_quota")
        assert too_poor.headers["x-should-retry"] == "false"

        client.form("/dashboard/billing/redeem", {"code": mint_code(web, "30")})
        upgraded = client.api("POST", "/api/billing/plan", {"plan": "pro"})
        assert upgraded.status_code == 200, upgraded.text
        body = upgraded.json()
        assert (body["change"], body["paid_usd"]) == ("upgraded", "29.000000")
        assert (body["account"]["plan"], body["account"]["balance_usd"]) == ("pro", "1.000000")
        wait_until(lambda: "dubhe-reasoning" in visible_models(web, key), "the upgrade on /v1")

        # A downgrade waits for the period's end, and the page offers to cancel it.
        later = client.form("/dashboard/billing/plan", {"plan": "starter"})
        assert (later.status_code, later.headers["location"]) == (303, "/dashboard/billing?notice=scheduled")
        page = client.get("/dashboard/billing").text
        assert "Moves to <strong>Starter</strong>" in page and "Cancel the downgrade" in page
        assert "dubhe-reasoning" in visible_models(web, key)
        cancelled = client.api("POST", "/api/billing/plan", {"plan": "pro"})
        assert cancelled.json()["change"] == "unchanged"
        assert cancelled.json()["account"]["next_plan"] is None


# -- usage and the statement ----------------------------------------------------------------------


def test_a_request_shows_in_usage_json_html_and_csv(web: WebServer) -> None:
    with web.client() as client:
        client.sign_up()
        created = client.create_key("usage-check")
        answer = httpx.post(web.base_url + "/chat/completions", headers=bearer(created["key"]),
                            json={"model": "dubhe-fast", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "Hello"}]}, timeout=30)
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-request-id"]
        usage = answer.json()["usage"]

        def listed() -> dict[str, Any] | None:
            rows = client.get("/api/usage/requests").json()["data"]
            return next((row for row in rows if row["request_id"] == request_id), None)

        row = wait_until(listed, "the request reaching /api/usage/requests")
        assert (row["model"], row["status_code"], row["api_key_id"]) == ("dubhe-fast", 200, created["id"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"])

        summary = client.get("/api/usage/summary").json()
        assert summary["period"] == "current"
        assert summary["models"] == [{
            "model": "dubhe-fast", "requests": 1, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "cost_usd": "0.000000"}]
        assert [(k["key_id"], k["name"], k["tokens"]) for k in summary["keys"]] == [
            (created["id"], "usage-check", usage["total_tokens"])]
        assert client.get("/api/usage/summary", params={"period": "previous"}).json()["days"] == []
        # The same numbers for a script holding the key: read-only routes take a key too.
        by_key = httpx.get(web.root + "/api/usage/summary", headers=bearer(created["key"]))
        assert by_key.json()["models"] == summary["models"]

        exported = client.get("/api/usage/requests.csv")
        assert exported.headers["content-type"].startswith("text/csv")
        assert "attachment" in exported.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [(r["request_id"], r["model"], r["prompt_tokens"]) for r in rows] == [
            (request_id, "dubhe-fast", str(usage["prompt_tokens"]))]

        page = client.get("/dashboard/usage")
        assert page.status_code == 200
        assert request_id in page.text and "usage-check" in page.text
        assert page.text.count("<svg") == 2
        assert client.get("/dashboard/usage", params={"period": "previous"}).status_code == 200
        assert client.get("/dashboard/usage", params={"period": "next"}).status_code == 422


def test_the_statement_in_json_csv_and_html_agrees_with_the_balance(web: WebServer) -> None:
    with web.client() as client:
        client.sign_up()
        for usd in ("1.25", "3.000001"):
            client.form("/dashboard/billing/redeem", {"code": mint_code(web, usd)})
        account = client.get("/api/account").json()
        assert account["balance_usd"] == "4.250001"

        first = client.get("/api/billing/statement", params={"limit": 2}).json()
        second = client.get("/api/billing/statement",
                            params={"limit": 2, "before": first["next_before"]}).json()
        lines = first["data"] + second["data"]
        assert [line["kind"] for line in lines] == ["redeem", "redeem", "grant"]
        assert [line["balance_usd"] for line in lines] == ["4.250001", "1.250000", "0.000000"]
        assert [line["amount_usd"] for line in lines] == ["3.000001", "1.250000", "0.000000"]
        assert second["next_before"] is None

        exported = list(csv.DictReader(io.StringIO(client.get("/api/billing/statement.csv").text)))
        assert [(r["kind"], r["amount_usd"], r["balance_usd"]) for r in exported] == [
            (line["kind"], line["amount_usd"], line["balance_usd"]) for line in lines]
        page = client.get("/dashboard/billing").text
        assert "+$3.000001" in page and "$4.250001" in page


# -- the site itself ------------------------------------------------------------------------------


def test_static_assets_carry_cache_headers(web: WebServer) -> None:
    home = httpx.get(web.root + "/")
    assert home.status_code == 200
    assert home.headers["cache-control"] == "no-store"
    assets = re.findall(r'(/static/[\w.]+\?v=[0-9a-f]+)', home.text)
    assert {asset.split("?")[0] for asset in assets} >= {"/static/dubhe.css", "/static/dubhe.js"}
    for asset in assets:
        response = httpx.get(web.root + asset)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers.get("etag")
    plain = httpx.get(web.root + "/static/dubhe.css")
    assert plain.headers["cache-control"] == "public, max-age=3600"
    assert httpx.get(web.root + "/static/../settings.py").status_code == 404


OPERATOR_TOML = """
[models.dubhe-fast]
name = "Acme Swift"
best_for = "Acme's support bots"
input_price_usd_per_mtok = "0.25"

[models.dubhe-qwen]
enabled = false

[plans.free]
included_tokens = 123_457

[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{sim}"
models = ["dubhe-fast", "dubhe-vision", "dubhe-reasoning", "dubhe-code", "dubhe-agent"]
"""


@pytest.fixture(scope="module")
def operator_site(sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker on SQLite with the operator's own catalog and public address."""
    data_dir = tmp_path_factory.mktemp("operator")
    (data_dir / "dubhe.toml").write_text(OPERATOR_TOML.format(sim=sims["fast"].base_url))
    port = free_port()
    env = {**os.environ, "DUBHE_DATA_DIR": str(data_dir), "DUBHE_CONFIG": str(data_dir / "dubhe.toml"),
           "DUBHE_PUBLIC_URL": f"http://127.0.0.1:{port}/", "DUBHE_LOG_LEVEL": "warning",
           "DUBHE_DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'dubhe.db'}"}
    log = data_dir / "serve.log"
    running = start_process([str(BIN / "dubhe"), "serve", "--port", str(port)], log, env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", running.process, log, timeout=120)
        server = Server(f"http://127.0.0.1:{port}/v1", env, env["DUBHE_DATABASE_URL"], data_dir,
                        running)
        yield server
        running.stop()
        assert_clean_log(server)
    finally:
        running.stop()


def example(page: str, language: str) -> str:
    match = re.search(rf'id="panel-{language}".*?<code>(.*?)</code>', page, re.S)
    assert match, f"no {language} example on the homepage"
    return html.unescape(match.group(1))


def test_the_homepage_follows_the_operators_catalog_and_address(operator_site: Server) -> None:
    root = operator_site.base_url.removesuffix("/v1")
    page = httpx.get(root + "/").text
    assert "Acme Swift" in page and "Acme&#39;s support bots" in page
    assert "$0.25 input" in page  # the operator's price, not the shipped $0.20
    assert "123,457" in page  # Free's included tokens
    assert "dubhe-qwen" not in page and "Dubhe Qwen" not in page
    assert "One API for 5 language models" in page
    assert f"{root}/v1/chat/completions" in page
    assert "http://127.0.0.1:8000" not in page


def test_the_homepage_code_examples_run_as_printed(operator_site: Server) -> None:
    root = operator_site.base_url.removesuffix("/v1")
    page = httpx.get(root + "/").text
    env = {**os.environ, "DUBHE_API_KEY": operator_site.new_key("free")}

    python = subprocess.run([sys.executable, "-c", example(page, "python")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert python.returncode == 0, python.stderr
    assert python.stdout.strip()

    shell = subprocess.run(["bash", "-euo", "pipefail", "-c", example(page, "curl")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0, shell.stderr
    assert '"object":"chat.completion"' in shell.stdout.replace(" ", "")
    assert "data: [DONE]" in shell.stdout

    if not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.fail("tests/node/node_modules is required: run `make test`, which installs it")
    script = NODE_DIR / f".homepage-example-{secrets.token_hex(4)}.mjs"
    script.write_text(example(page, "node"))
    try:
        node = subprocess.run(["node", str(script)], cwd=NODE_DIR, env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        script.unlink()
    assert node.returncode == 0, node.stderr
    assert node.stdout.strip()
