"""Balance adjustments from the console under concurrency, on SQLite and on PostgreSQL: one
idempotency key raced by many requests applies exactly once; many keys at once all apply; the
account's counters equal their recomputation from the ledger afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dubhe.database import create_engine
from tests.admin.conftest import WebServer, make_admin
from tests.conftest import Sim, assert_clean_log, fetch_one, fresh_database
from tests.web.conftest import Mailbox, start_web_server

RACERS = 20


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def money_web(request: pytest.FixtureRequest, sims: dict[str, Sim], mailbox: Mailbox,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    tmp = tmp_path_factory.mktemp(f"adjust-{request.param}")
    with fresh_database(request.param, tmp) as url:
        server = start_web_server(tmp, url, sims, workers=2, DUBHE_SIGNUP_MODE="open",
                                  DUBHE_SMTP_URL=mailbox.url)
        try:
            yield WebServer(server, server.base_url.removesuffix("/v1"))
        finally:
            server.running.stop()
        assert_clean_log(server)


async def account_and_ledger(database_url: str, user_id: int) -> tuple[int, int, int]:
    engine = create_engine(database_url)
    try:
        account = await fetch_one(engine, "SELECT balance_uusd + balance_reserved_uusd AS b "
                                  "FROM accounts WHERE user_id = :u", u=user_id)
        ledger = await fetch_one(engine, "SELECT COALESCE(SUM(balance_uusd + "
                                 "balance_reserved_uusd), 0) AS b FROM ledger_entries WHERE "
                                 "user_id = :u", u=user_id)
        adjustments = await fetch_one(engine, "SELECT COUNT(*) AS n FROM ledger_entries WHERE "
                                      "user_id = :u AND kind IN ('admin_credit', 'admin_debit')",
                                      u=user_id)
        return int(account["b"]), int(ledger["b"]), int(adjustments["n"])
    finally:
        await engine.dispose()


def test_adjustments_race_safely(money_web: WebServer) -> None:
    admin_email = make_admin(money_web)
    with money_web.client() as user, money_web.client() as admin:
        user.sign_up()
        user_id = int(user.get("/api/account/me").json()["id"])
        assert admin.log_in(admin_email).status_code == 200
        token = admin.csrf()
        url = f"/admin/api/users/{user_id}/balance"

        def adjust(body: dict[str, str]) -> httpx.Response:
            return admin.http.post(url, json=body, headers={"x-csrf-token": token})

        same = {"amount_usd": "1.00", "reason": "one credit", "idempotency_key": "same-key-1"}
        with ThreadPoolExecutor(RACERS) as pool:
            answers = list(pool.map(adjust, [same] * RACERS))
        assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
        assert sum(answer.json()["applied"] for answer in answers) == 1
        assert asyncio.run(account_and_ledger(money_web.server.database_url, user_id))[0] \
            == 1_000_000

        # Many keys at once: credits and take-backs all apply, none lost, none twice.
        bodies = [{"amount_usd": "0.50" if n % 2 else "-0.25", "reason": f"race {n}",
                   "idempotency_key": f"many-keys-{n}"} for n in range(RACERS)]
        with ThreadPoolExecutor(RACERS) as pool:
            answers = list(pool.map(adjust, bodies))
        assert [answer.status_code for answer in answers] == [200] * RACERS
        assert all(answer.json()["applied"] for answer in answers)
        balance, from_ledger, count = asyncio.run(
            account_and_ledger(money_web.server.database_url, user_id))
        expected = 1_000_000 + (RACERS // 2) * 500_000 - (RACERS // 2) * 250_000
        assert balance == from_ledger == expected
        assert count == 1 + RACERS
        assert user.get("/api/account").status_code == 200


def test_the_console_and_the_chat_run_on_this_database(money_web: WebServer) -> None:
    admin_email = make_admin(money_web)
    with money_web.client() as visitor, money_web.client() as admin:
        assert admin.log_in(admin_email).status_code == 200
        sent = visitor.api("POST", "/api/chat/messages", {"body": "hello from here"})
        conversation_id = sent.json()["conversation_id"]
        row = next(r for r in admin.get("/admin/api/inbox").json()["conversations"]
                   if r["conversation_id"] == conversation_id)
        assert row["unread"] == 1 and row["last_message"] == "hello from here"
        assert admin.api("POST", f"/admin/api/inbox/{conversation_id}/messages",
                         {"body": "hi"}).status_code == 201
        assert [m["author"] for m in visitor.get("/api/chat").json()["messages"]] == [
            "visitor", "admin"]
        for on in (True, False):
            assert admin.api("POST", "/admin/api/models/dubhe-code/maintenance",
                             {"maintenance": on}).status_code == 200
        assert admin.api("POST", "/admin/api/codes", {"amount_usd": "1", "count": 1}
                         ).status_code == 201
        for path in ("/admin/api/users", "/admin/api/models", "/admin/api/upstreams",
                     "/admin/api/codes", "/admin/api/totals", "/admin/api/audit", "/admin",
                     "/admin/inbox", f"/admin/inbox/{conversation_id}"):
            assert admin.get(path).status_code == 200, path
