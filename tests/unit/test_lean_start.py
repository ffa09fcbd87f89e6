"""A worker's start imports what ``/v1`` needs, nothing else: the WebSocket stack, the tokenizer
and the web app are imported by the first request that uses them (each is a few to hundreds of
milliseconds of every worker's cold start). In a fresh interpreter, as ``dubhe serve`` runs a
worker: the CLI's and the server's imports, then the real start-up on a real SQLite database."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.unit.fresh_worker import last_line_of

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import dubhe.cli, uvicorn
    from dubhe.server import SECURITY_HEADERS, DubheHttpProtocol, websocket_protocol
    from dubhe.app import create_app

    async def start_and_stop():
        app = create_app()
        await app.startup()
        loaded = sorted(name for name in ("websockets", "tiktoken", "dubhe.gateway.ws",
                                          "dubhe.server._websocket", "fastapi")
                        if name in sys.modules)
        await app.shutdown()
        return loaded

    print(json.dumps(asyncio.run(start_and_stop())))
""")


def test_a_started_worker_has_not_imported_what_only_some_requests_need(tmp_path: Path) -> None:
    assert json.loads(last_line_of(SCRIPT, tmp_path)) == []
