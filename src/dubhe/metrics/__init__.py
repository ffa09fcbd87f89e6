"""Prometheus metrics at ``/metrics``, correct with several workers.

``dubhe serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before its workers
start (before anything imports prometheus-client, which reads it at import), so each worker's counters live in its own memory-mapped file
and a scrape of any worker sums them all (prometheus-client's multiprocess mode). Without that
variable (an app run some other way) the scrape shows this process alone.

Counting is one ``inc`` per request on the response's start; nothing is parsed or formatted on
the hot path.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every inc() asks the kernel for the process id (a fork must start its own
# file): a system call per counter, several per request. The id is kept here instead, and renewed
# in a forked child, which is all that check is for.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


if os.environ.get(MULTIPROC_ENV):
    os.register_at_fork(after_in_child=_forked)
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)  # type: ignore[no-untyped-call]

REQUESTS = Counter("dubhe_http_requests", "HTTP responses on /v1, by path and status.",
                   ["path", "status"])
RATE_LIMIT_REJECTIONS = Counter("dubhe_ratelimit_rejections",
                                "Requests refused with 429 by a plan limit, by limit.", ["limit"])
REDIS_FAILURES = Counter("dubhe_ratelimit_redis_failures",
                         "Redis calls of the rate limiter that failed (policy applied).")

# One label set per known path: a scanner's made-up URLs must not grow the series without end.
_KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})


def path_label(path: str) -> str:
    if path in _KNOWN_PATHS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


# labels() builds and checks a tuple and takes a lock on every call: the hot path keeps the
# children it has used (a bounded set: known paths times statuses, models of the catalog).
_children: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def count_request(path: str, status: int) -> None:
    child(REQUESTS, path_label(path), str(status)).inc()


def scrape() -> bytes:
    """The text exposition of every worker's counters (or this process's alone)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
