"""When credit cannot be leased because the database is gone, requests get a clear, retryable 503."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx

from tests.conftest import POSTGRES_ADMIN_URL, Sim, run_psql, start_server


def test_lost_database_means_503_billing_unavailable(sims: dict[str, Sim], tmp_path: Path) -> None:
    name = f"dubhe_test_{secrets.token_hex(6)}"
    run_psql(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    config = f"""
[defaults]
lease_idle_seconds = 0.3

[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{sims['fast'].base_url}"
models = ["dubhe-fast"]
"""
    server = start_server(tmp_path, f"{base}/{name}", config)
    try:
        key = server.new_key("free")
        body = {"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        url = server.base_url + "/chat/completions"
        # Warms the key in the worker's cache; the worker's lease returns after 0.3 s idle.
        assert httpx.post(url, json=body, headers=headers).status_code == 200
        time.sleep(1.5)
        run_psql(f'DROP DATABASE "{name}" WITH (FORCE)')
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "billing_unavailable")
        assert int(response.headers["retry-after"]) > 0
    finally:
        server.running.stop()
        run_psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
