"""The help chat's optional automatic first answer, on: it runs through the real /v1 path, billed
to the operator's support account (never to the visitor), once per conversation, with its output
capped; off (the default, every other test's server), no model is called."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from dubhe.database import create_engine
from tests.admin.conftest import WebClient, WebServer
from tests.conftest import BIN, Sim, assert_clean_log, fetch_one, free_port, fresh_database
from tests.web.conftest import PASSWORD, gateway_config, start_web_server

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def assisted(sims: dict[str, Sim],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebServer, str]]:
    """One worker with the assistant on; the support account and its key made with the CLI
    before the server starts (the key is part of its configuration)."""
    tmp = tmp_path_factory.mktemp("assistant")
    with fresh_database("sqlite", tmp) as url:
        (tmp / "dubhe.toml").write_text(gateway_config(sims, dead_port=free_port()))
        env = {**os.environ, "DUBHE_DATA_DIR": str(tmp), "DUBHE_DATABASE_URL": url,
               "DUBHE_CONFIG": str(tmp / "dubhe.toml"), "DUBHE_LOG_LEVEL": "warning"}
        support = "support@example.com"

        def cli(*args: str) -> str:
            return subprocess.run([str(BIN / "dubhe"), *args], env=env, check=True, text=True,
                                  capture_output=True, timeout=180).stdout.strip()

        cli("users", "create", support, "--password", PASSWORD, "--plan", "pro")
        key = cli("keys", "create", support, "--name", "help chat assistant")
        server = start_web_server(
            tmp, url, sims, workers=1, DUBHE_SIGNUP_MODE="open",
            DUBHE_HELP_CHAT_ASSISTANT_MODEL="dubhe-fast", DUBHE_HELP_CHAT_ASSISTANT_API_KEY=key,
            DUBHE_HELP_CHAT_ASSISTANT_MAX_TOKENS=str(MAX_TOKENS))
        try:
            yield WebServer(server, server.base_url.removesuffix("/v1")), support
        finally:
            server.running.stop()
        assert_clean_log(server)


async def support_usage(database_url: str, email: str) -> tuple[int, int]:
    engine = create_engine(database_url)
    try:
        row = await fetch_one(
            engine, "SELECT COUNT(*) AS n, COALESCE(MAX(completion_tokens), 0) AS most FROM "
            "usage_records JOIN users ON users.id = usage_records.user_id WHERE users.email = :e",
            e=email)
        return int(row["n"]), int(row["most"])
    finally:
        await engine.dispose()


def assistant_messages(client: WebClient) -> list[dict[str, object]]:
    return [m for m in client.get("/api/chat").json()["messages"] if m["author"] == "assistant"]


def test_the_first_message_gets_one_automatic_answer_paid_by_support(
        assisted: tuple[WebServer, str]) -> None:
    server, support = assisted
    with server.client() as visitor:
        sent = visitor.api("POST", "/api/chat/messages", {"body": "How do I list models?"})
        assert sent.status_code == 201, sent.text
        deadline = time.monotonic() + 30
        while not assistant_messages(visitor):
            assert time.monotonic() < deadline, "no automatic answer"
            time.sleep(0.2)
        answer = assistant_messages(visitor)[0]
        assert "a person from our team will follow up" in str(answer["body"])
        # More messages in the same conversation: no more drafts.
        for text in ("thanks", "and another question"):
            assert visitor.api("POST", "/api/chat/messages", {"body": text}).status_code == 201
        time.sleep(2)
        assert len(assistant_messages(visitor)) == 1
    # Metered on the support account, through /v1, within the cap.
    deadline = time.monotonic() + 15
    while True:
        count, most = asyncio.run(support_usage(server.server.database_url, support))
        if count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count == 1
    assert 0 < most <= MAX_TOKENS
