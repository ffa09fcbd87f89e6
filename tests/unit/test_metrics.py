"""A request's counts wait in the worker until ``sync()`` (dubhe/metrics): what a scrape shows
afterwards is what prometheus-client's own ``inc`` and ``observe`` would have shown."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from dubhe import metrics

BOUNDS = (0.01, 0.1, 1.0, float("inf"))
# Bucket edges included: an amount equal to a bound lands in that bound's bucket.
AMOUNTS = [0.0, 0.005, 0.01, 0.0100001, 0.1, 0.5, 1.0, 3.0, 1e9, 0.07]


def _pair(registry: CollectorRegistry) -> tuple[Histogram, Counter]:
    histogram = Histogram("t_seconds", "t", ["path"], buckets=BOUNDS, registry=registry)
    counter = Counter("t_things", "t", ["kind"], registry=registry)
    return histogram, counter


def test_synced_sums_expose_as_observe_and_inc_do() -> None:
    direct = CollectorRegistry()
    direct_histogram, direct_counter = _pair(direct)
    deferred = CollectorRegistry()
    deferred_histogram, deferred_counter = _pair(deferred)
    for i, amount in enumerate(AMOUNTS):
        path = "a" if i % 3 else "b"
        direct_histogram.labels(path).observe(amount)
        metrics.observe_seconds(deferred_histogram, BOUNDS, path, amount)
        direct_counter.labels(path).inc(i)
        metrics.add(deferred_counter, path, amount=i)
    # Nothing reaches the registry before a sync.
    assert b"t_things_total{" not in generate_latest(deferred)
    metrics.sync()
    exposed = generate_latest(deferred)
    assert b't_seconds_bucket{le="0.01",path="b"}' in exposed
    # Counters carry their creation time, which differs between the two registries.
    def comparable(text: bytes) -> list[bytes]:
        return [line for line in text.splitlines() if b"_created" not in line]
    assert comparable(exposed) == comparable(generate_latest(direct))
    # A second sync adds only what came since.
    metrics.add(deferred_counter, "a", amount=5)
    direct_counter.labels("a").inc(5)
    metrics.sync()
    metrics.sync()
    assert comparable(generate_latest(deferred)) == comparable(generate_latest(direct))
