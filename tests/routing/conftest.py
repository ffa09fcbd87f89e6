from __future__ import annotations

import re

# SQLAlchemy's pool can log a cancelled rollback while a worker shuts down (SQLite): a known
# shutdown artefact, not an error of a request.
_SHUTDOWN_RESET = re.compile(
    r"Exception during reset or similar\nTraceback \(most recent call last\):\n(?:  .*\n)*"
    r"asyncio\.exceptions\.CancelledError\n"
)


def assert_no_tracebacks(log: str) -> None:
    assert "Traceback" not in _SHUTDOWN_RESET.sub("", log), log
