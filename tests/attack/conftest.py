"""A `dubhe serve` on the realistic upstream (one token per prompt byte, honest usage) with
small plans, so that anything the hold does not cover shows up as debt at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dubhe.catalog import load_catalog
from dubhe.database import create_engine
from tests.billing.conftest import Billing
from tests.conftest import assert_clean_log, fresh_database, start_server
from tests.upstreams.realistic import Realistic
from tests.ws.conftest import ws, ws_database  # noqa: F401 (the WebSocket server: test_ws.py)

PLANS = """
[defaults]
reservation_ttl_seconds = 3
lease_idle_seconds = 1.5

[plans.tiny]
name = "Tiny"
price_usd = "0"
models = ["dubhe-fast", "dubhe-reasoning"]
included_tokens = 1000
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000

[plans.metered]
name = "Metered"
price_usd = "0"
models = ["dubhe-fast", "dubhe-reasoning"]
included_tokens = 0
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 1000
"""


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def attack_database(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(request.param, tmp_path_factory.mktemp("attack-db")) as url:
        yield url


@pytest.fixture(scope="session")
async def honest(attack_database: str, realistic: Realistic,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Billing]:
    """Billing against the realistic upstream, which reports its usage honestly by default."""
    config = PLANS + f"""
[[upstreams]]
name = "realistic"
kind = "openai"
base_url = "{realistic.base_url}"
models = ["dubhe-fast", "dubhe-reasoning"]
"""
    data_dir = tmp_path_factory.mktemp("attack")
    server = start_server(data_dir, attack_database, config)
    engine = create_engine(attack_database)
    yield Billing(server, engine, load_catalog(Path(server.env["DUBHE_CONFIG"])))
    await engine.dispose()
    server.running.stop()
    assert_clean_log(server)
