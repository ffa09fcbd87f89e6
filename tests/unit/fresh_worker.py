"""Running a script in a fresh interpreter as ``dubhe serve`` runs a worker: no DUBHE_* from
the caller's shell, a data directory of its own with its database migrated, no catalog file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DUBHE = str(Path(sys.executable).parent / "dubhe")


def worker_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUBHE_")}
    env.update(DUBHE_DATA_DIR=str(tmp_path), DUBHE_CONFIG=str(tmp_path / "none.toml"))
    return env


def last_line_of(script: str, tmp_path: Path) -> str:
    """Migrate a fresh SQLite database, run ``script`` and return the last line it printed."""
    env = worker_env(tmp_path)
    subprocess.run([DUBHE, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip().splitlines()[-1]
