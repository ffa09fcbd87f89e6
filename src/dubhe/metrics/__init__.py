"""Prometheus metrics at ``/metrics``, correct with several workers.

``dubhe serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before its workers
start (before anything imports prometheus-client, which reads it at import), so each worker's counters live in its own memory-mapped file
and a scrape of any worker sums them all (prometheus-client's multiprocess mode). Without that
variable (an app run some other way) the scrape shows this process alone.

A request adds to plain dicts of this worker (``add``, ``observe_seconds``): in multiprocess mode
every ``inc`` of prometheus-client takes a lock and packs a double into the mapped file, several
per request, about a tenth of a worker's CPU under load. ``sync()`` moves the sums into
prometheus-client's values once a second (``every_second``), before this worker answers a scrape,
and at shutdown: a scrape answered by another worker may trail this one's last second.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
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
    # What the parent counted is the parent's to write.
    _counts.clear()
    _histograms.clear()


def _process_id() -> int:
    return _pid


os.register_at_fork(after_in_child=_forked)
if os.environ.get(MULTIPROC_ENV):
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


# Not yet synced: a counter's amount by (metric, *labels); a histogram's sum and count per bucket
# (its upper bounds, +Inf last, as prometheus-client keeps them) by (metric, *labels).
_counts: dict[tuple[Any, ...], float] = {}
_histograms: dict[tuple[Any, ...], list[float]] = {}


def add(metric: Any, *labels: str, amount: float = 1) -> None:
    """``metric.labels(*labels).inc(amount)``, at the next ``sync()``."""
    key = (metric, *labels)
    _counts[key] = _counts.get(key, 0) + amount


def observe_seconds(metric: Any, bounds: tuple[float, ...], label: str, amount: float) -> None:
    """``metric.labels(label).observe(amount)`` for a histogram whose buckets are ``bounds``
    (ending with +Inf), at the next ``sync()``."""
    key = (metric, label)
    sums = _histograms.get(key)
    if sums is None:
        sums = _histograms[key] = [0.0] * (len(bounds) + 1)
    sums[0] += amount
    # The first bucket whose upper bound takes the amount, as Histogram.observe picks it.
    sums[1 + bisect_left(bounds, amount)] += 1


def count_request(path: str, status: int) -> None:
    add(REQUESTS, path_label(path), str(status))


def sync() -> None:
    """Write what this worker counted since the last call into prometheus-client's values."""
    counts = list(_counts.items())
    _counts.clear()
    histograms = list(_histograms.items())
    _histograms.clear()
    for (metric, *labels), amount in counts:
        child(metric, *labels).inc(amount)
    for (metric, *labels), sums in histograms:
        found = child(metric, *labels)
        # A histogram child's sum and buckets (prometheus-client 0.26, pinned): adding a count
        # to a bucket is what observe() does once per observation. tests/unit/test_metrics.py
        # checks the exposition against observe()'s own.
        found._sum.inc(sums[0])
        for bucket, count in zip(found._buckets, sums[1:], strict=True):
            if count:
                bucket.inc(count)


async def every_second() -> None:
    """``sync()`` once a second, until cancelled (then once more)."""
    try:
        while True:
            await asyncio.sleep(1)
            sync()
    finally:
        sync()


def scrape() -> bytes:
    """The text exposition of every worker's counters (or this process's alone)."""
    sync()
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
