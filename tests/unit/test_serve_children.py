"""The processes ``dubhe serve`` starts for its upstreams end with it, however it ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, fresh_database, start_server


def _pids_serving(port: int) -> list[int]:
    """Processes whose command line names ``port`` and ``dubhe.sim``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dubhe.sim" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


def _gone(port: int) -> bool:
    deadline = time.monotonic() + 30
    while _pids_serving(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _pids_serving(port)


# SIGTERM is how a service manager stops it (uvicorn raises the signal again once it has shut
# down, so no atexit handler runs); SIGKILL runs nothing at all.
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_builtin_simulator_ends_with_dubhe_serve(
        how: signal.Signals, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("children")
    port = free_port()
    config = f"""
[[upstreams]]
name = "builtin"
kind = "sim"
base_url = "http://127.0.0.1:{port}/v1"
models = ["dubhe-fast"]
"""
    with fresh_database("sqlite", tmp) as url:
        server = start_server(tmp, url, config)
        try:
            assert len(_pids_serving(port)) == 1
            os.kill(server.running.process.pid, how)
            server.running.process.wait(timeout=30)
            assert _gone(port), "the simulator outlived dubhe serve"
        finally:
            server.running.stop()
            for pid in _pids_serving(port):
                os.kill(pid, signal.SIGKILL)
