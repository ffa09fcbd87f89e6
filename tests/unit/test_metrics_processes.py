"""Counters in multiprocess mode keep the process id rather than asking the kernel on every
``inc``; a forked child must still count into a file of its own, or a scrape would miss (or
double) its counts. In a fresh interpreter, with ``PROMETHEUS_MULTIPROC_DIR`` set before the
import, as ``dubhe serve`` sets it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os
    from dubhe import metrics

    metrics.count_request("/v1/models", 200)
    metrics.sync()
    child = os.fork()
    if child == 0:
        metrics.count_request("/v1/models", 200)
        metrics.count_request("/v1/models", 200)
        metrics.sync()  # as a worker's shutdown does
        os._exit(0)
    os.waitpid(child, 0)
    metrics.count_request("/v1/models", 200)
    files = sorted(name for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    print(files == sorted([f"counter_{os.getpid()}.db", f"counter_{child}.db"]))
    print(metrics.scrape().decode())
""")


def test_a_forked_child_counts_into_its_own_file(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    ran = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "True", ran.stdout
    assert 'dubhe_http_requests_total{path="/v1/models",status="200"} 4.0' in lines
