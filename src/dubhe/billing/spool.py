"""A worker's local append-only spool of settled usage, flushed to the database in batches.

A settlement is written here (one ``os.write`` of one JSON line) before the client sees the end
of its answer: the kernel keeps the bytes if the process dies, so a SIGKILL loses nothing. Each
worker holds an exclusive ``flock`` on its own lock file while it lives; a spool whose lock can be
taken belongs to a dead worker, and any worker on the machine replays it into the database
(idempotently: settlements are keyed by request id).

What comes back from a spool is checked before any SQL sees it (``record_problem``): a file on
disk can hold anything, from a record of an older version to a line a bug wrote. A record that
fails, or that the database refuses anyway, goes to the dead-letter file (``DeadLetters``), with
the reason, for an operator to look at; it never blocks the records around it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from dubhe.models.base import utcnow

# The usage columns are 32-bit on PostgreSQL; no request can use two billion tokens.
MAX_TOKEN_COUNT = 2**31 - 1
# Lease and money amounts are BIGINT.
_MAX_AMOUNT = 2**62
_USAGE_SOURCES = frozenset({"upstream", "estimated"})
# name -> (accepted types, whether None is allowed, the largest value or string length)
_FIELDS: dict[str, tuple[tuple[type, ...], bool, int]] = {
    "request_id": ((str,), False, 64),
    "user_id": ((int,), False, _MAX_AMOUNT),
    "api_key_id": ((int,), True, _MAX_AMOUNT),
    "lease_id": ((int,), False, _MAX_AMOUNT),
    "model": ((str,), False, 64),
    "upstream": ((str,), True, 64),
    "stream": ((bool,), False, 1),
    "prompt_tokens": ((int,), False, MAX_TOKEN_COUNT),
    "completion_tokens": ((int,), False, MAX_TOKEN_COUNT),
    "usage_source": ((str,), False, 16),
    "outcome": ((str,), False, 24),
    "status_code": ((int,), False, 999),
    "latency_ms": ((int,), False, MAX_TOKEN_COUNT),
    "created_at": ((str,), False, 64),
    "tokens_used": ((int,), False, _MAX_AMOUNT),
    "uusd_used": ((int,), False, _MAX_AMOUNT),
}


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
        os.write(self._fd, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

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


# _FIELDS by exact type, each field as (name, nullable, largest value or length): the checks
# record_problem makes first, in one pass over a record as Dubhe and orjson build them.
_EXACT: dict[type, tuple[tuple[str, bool, int], ...]] = {
    kind: tuple((name, nullable, limit) for name, (types, nullable, limit) in _FIELDS.items()
                if types == (kind,))
    for kind in (int, str, bool)
}
assert sum(map(len, _EXACT.values())) == len(_FIELDS)


def _sound(record: Any, models: Mapping[str, object]) -> bool:
    """Whether record_problem finds nothing, on the path every record Dubhe writes takes (about
    half of the full check's cost per settlement); False sends it to the full check."""
    if type(record) is not dict:
        return False
    get = record.get
    for name, nullable, limit in _EXACT[int]:
        value = get(name)
        if type(value) is not int or not 0 <= value <= limit:
            if value is not None or not nullable or name not in record:
                return False
    for name, nullable, limit in _EXACT[str]:
        value = get(name)
        if type(value) is not str or not 0 < len(value) <= limit:
            if value is not None or not nullable or name not in record:
                return False
    for name, _, _ in _EXACT[bool]:
        if type(get(name)) is not bool:
            return False
    if (record["usage_source"] not in _USAGE_SOURCES or record["model"] not in models
            or record["tokens_used"] > record["prompt_tokens"] + record["completion_tokens"]):
        return False
    try:
        return datetime.fromisoformat(record["created_at"]).tzinfo is not None
    except ValueError:
        return False


def record_problem(record: Any, models: Mapping[str, object]) -> str | None:
    """Why a settled-usage record cannot be written, or None if it can: every field of the right
    type and range (counts non-negative integers, never a bool or float), a known model, a
    UTC timestamp, and a lease charge no larger than the usage."""
    if _sound(record, models):
        return None
    if not isinstance(record, dict):
        return f"not a record: {type(record).__name__}"
    for name, (types, nullable, limit) in _FIELDS.items():
        if name not in record:
            return f"{name} is missing"
        value = record[name]
        if value is None:
            if nullable:
                continue
            return f"{name} is null"
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            return f"{name} is a {type(value).__name__}"
        if isinstance(value, str) and not 0 < len(value) <= limit:
            return f"{name} is empty or longer than {limit} characters"
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            return f"{name} is {value}, outside 0..{limit}"
    if record["usage_source"] not in _USAGE_SOURCES:
        return f"usage_source is {record['usage_source']!r}"
    if record["model"] not in models:
        return f"model {record['model']!r} is not in the catalog"
    if record["tokens_used"] > record["prompt_tokens"] + record["completion_tokens"]:
        return "it charges more included tokens than it used"
    try:
        created_at = datetime.fromisoformat(record["created_at"])
    except ValueError:
        return f"created_at {record['created_at']!r} is not a timestamp"
    if created_at.tzinfo is None:
        return "created_at has no time zone"
    return None


class DeadLetters:
    """Where records the database cannot take are set aside, one JSON line each, with why."""

    def __init__(self, spool_directory: Path, owner: str) -> None:
        directory = spool_directory / "dead-letter"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{owner}.jsonl"

    def append(self, record: Any, reason: str) -> None:
        entry = {"reason": reason, "set_aside_at": utcnow().isoformat(), "record": record}
        try:
            line = orjson.dumps(entry, default=repr)
        except TypeError:  # e.g. an integer beyond 64 bits
            line = orjson.dumps({**entry, "record": repr(record)})
        with self.path.open("ab") as file:
            file.write(line + b"\n")
