"""A worker's local append-only spool of settled usage, flushed to the database in batches.

A settlement is written here (one ``os.write`` of one JSON line) before the client sees the end
of its answer: the kernel keeps the bytes if the process dies, so a SIGKILL loses nothing. Each
worker holds an exclusive ``flock`` on its own lock file while it lives; a spool whose lock can be
taken belongs to a dead worker, and any worker on the machine replays it into the database
(idempotently: settlements are keyed by request id).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._lock_fd = os.open(directory / f"{self.owner}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._sequence = 0
        self._fd = -1
        self.path = self._open_next()

    def _open_next(self) -> Path:
        self._sequence += 1
        path = self.directory / f"{self.owner}.{self._sequence:08d}.jsonl"
        self._fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        return path

    def append(self, record: dict[str, Any]) -> None:
        os.write(self._fd, orjson.dumps(record) + b"\n")

    def rotate(self) -> Path:
        """Start a new file; return the finished one (delete it once its records are committed)."""
        finished = self.path
        os.close(self._fd)
        self.path = self._open_next()
        return finished

    def close(self) -> None:
        os.close(self._fd)
        if self.path.stat().st_size == 0:
            self.path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        (self.directory / f"{self.owner}.lock").unlink(missing_ok=True)

    def orphans(self) -> Iterator[tuple[Path, list[Path]]]:
        """The lock file and spool files of each dead worker (whose lock is free)."""
        for lock in sorted(self.directory.glob("*.lock")):
            owner = lock.name.removesuffix(".lock")
            if owner == self.owner:
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # alive
            try:
                yield lock, sorted(self.directory.glob(f"{owner}.*.jsonl"))
            finally:
                os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a line cut by a crash in the middle of its write was never acknowledged
    return records
