"""The CLI imports with the cyclic collector off; a worker turns it back on at the end of its
start-up, the other servers at once, so no long-running process runs without it. In a fresh interpreter, as ``dubhe serve`` runs
a worker: the real start-up on a real SQLite database."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.fresh_worker import last_line_of, worker_env

SCRIPT = textwrap.dedent("""
    import asyncio, gc, json
    import dubhe.cli
    off_while_importing = not gc.isenabled()
    from dubhe.app import create_app

    async def start_and_stop():
        app = create_app()
        await app.startup()
        on_after_start = gc.isenabled()
        await app.shutdown()
        return on_after_start

    print(json.dumps({"off_while_importing": off_while_importing,
                      "on_after_start": asyncio.run(start_and_stop())}))
""")


def test_the_collector_is_off_for_the_imports_and_on_once_the_worker_started(
        tmp_path: Path) -> None:
    assert last_line_of(SCRIPT, tmp_path) == (
        '{"off_while_importing": true, "on_after_start": true}')


@pytest.mark.parametrize(("argv", "enabled"), [
    # One-shot: it ends within seconds, so the collector never comes back on.
    (["migrate"], False),
    # Servers that run for as long as they are let: on at once (this one fails to bind, after).
    (["upstream-sim", "--host", "256.0.0.1", "--port", "9"], True),
])
def test_long_running_commands_turn_the_collector_back_on(tmp_path: Path, argv: list[str],
                                                          enabled: bool) -> None:
    script = ("import atexit, gc, sys, dubhe.cli; "
              "atexit.register(lambda: print('enabled', gc.isenabled())); "
              f"dubhe.cli.main({argv!r})")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env=worker_env(tmp_path))
    assert ran.stdout.strip().splitlines()[-1] == f"enabled {enabled}", (ran.stdout, ran.stderr)
