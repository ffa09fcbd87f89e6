"""The processes ``dubhe serve`` starts for its upstreams end with it, however it ends."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import free_port, fresh_database, pids_running, start_server


def _pids_serving(port: int) -> list[int]:
    return pids_running(b"dubhe.sim", str(port).encode())


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
