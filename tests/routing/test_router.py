"""The router and the breaker in memory, and the configuration they are built from."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from dubhe.catalog import CatalogError, UpstreamSpec, load_catalog
from dubhe.routing import Breaker, BreakerState, Router, backoff_seconds


@dataclass(frozen=True, eq=False)
class Deployment:
    spec: UpstreamSpec
    breaker: Breaker


def deployment(name: str, *, weight: int = 1, priority: int = 0) -> Deployment:
    spec = UpstreamSpec(name, "openai", "http://x/v1", ("m",), weight=weight, priority=priority)
    return Deployment(spec, Breaker(name, failures=3, cooldown=10))


def test_weighted_choice_within_the_best_tier() -> None:
    heavy, light, spare = deployment("heavy", weight=3), deployment("light"), deployment(
        "spare", priority=1
    )
    router = Router(random.Random(7))
    picks = Counter(router.choose([heavy, light, spare], (), 0.0).spec.name for _ in range(4000))  # type: ignore[union-attr]
    assert picks["spare"] == 0
    assert 2.5 < picks["heavy"] / picks["light"] < 3.5


def test_the_next_tier_serves_when_the_best_one_is_down_or_excluded() -> None:
    best, spare = deployment("best"), deployment("spare", priority=1)
    router = Router()
    assert router.choose([best, spare], {best}, 0.0) is spare
    for _ in range(3):
        best.breaker.failed(1.0)
    assert best.breaker.state is BreakerState.OPEN
    assert router.choose([best, spare], (), 2.0) is spare
    assert router.choose([best, spare], {spare}, 2.0) is None
    assert router.soonest_retry([best, spare], 2.0) == 0.0  # spare is fine
    assert Router.soonest_retry([best], 2.0) == pytest.approx(9.0)


def test_breaker_half_opens_after_the_cooldown_with_one_trial() -> None:
    breaker = Breaker("b", failures=3, cooldown=10)
    for _ in range(2):
        breaker.failed(0.0)
    assert breaker.state is BreakerState.CLOSED and breaker.usable(0.0)
    breaker.failed(0.0)
    assert breaker.state is BreakerState.OPEN and not breaker.usable(9.9)
    assert breaker.usable(10.0)
    breaker.take(10.0)  # the trial
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.usable(10.1)
    breaker.failed(10.5)  # the trial failed: open again, for another cool-down
    assert breaker.state is BreakerState.OPEN and not breaker.usable(20.0)
    breaker.take(20.5)
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.usable(20.6)


def test_breaker_opens_on_a_failure_rate_without_a_streak() -> None:
    breaker = Breaker("b", failures=3, cooldown=10)
    for _ in range(5):
        breaker.succeeded()
        breaker.failed(0.0)
    assert breaker.state is BreakerState.OPEN


def test_one_account_s_failures_never_open_a_breaker_two_accounts_do() -> None:
    breaker = Breaker("b", failures=3, cooldown=10)
    # A client whose requests make the upstream fail (a 5xx, a broken answer): never opened for
    # everyone, by a streak or by a rate.
    for _ in range(30):
        breaker.failed(0.0, account=7)
    for _ in range(10):
        breaker.succeeded()
        breaker.failed(0.0, account=7)
    assert breaker.state is BreakerState.CLOSED and breaker.usable(0.0)
    breaker.failed(0.0, account=8)  # another account fails there too: it is the upstream
    assert breaker.state is BreakerState.OPEN
    # A failure no request could cause (connection refused) counts whoever sent it.
    refused = Breaker("r", failures=3, cooldown=10)
    refused.failed(0.0, account=7)
    refused.failed(0.0, account=7)
    refused.failed(0.0, account=None)
    assert refused.state is BreakerState.OPEN


def test_a_sole_deployment_is_tried_with_its_breaker_open_but_not_when_paused() -> None:
    only = deployment("only")
    router = Router()
    for _ in range(3):
        only.breaker.failed(0.0)
    assert router.choose([only], (), 1.0) is only  # nowhere else to go
    only.breaker.failed(1.0, retry_after=30)  # the upstream asked for 30 s
    assert router.choose([only], (), 2.0) is None
    assert router.choose([only], (), 31.5) is only


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    assert all(0 <= backoff_seconds(1, rng) <= 0.05 for _ in range(100))
    assert max(backoff_seconds(3, rng) for _ in range(200)) > 0.1
    assert all(backoff_seconds(30, rng) <= 2.0 for _ in range(100))


def write(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "dubhe.toml"
    config.write_text(text)
    return config


def test_two_entries_listing_one_model_are_two_deployments(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, """
[[upstreams]]
name = "a"
base_url = "http://a/v1"
models = ["dubhe-fast"]

[[upstreams]]
name = "b"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
models = ["dubhe-fast"]
weight = 3
priority = 1
first_byte_timeout_seconds = 5
idle_timeout_seconds = 2.5
context_window = 200000
vision = false
"""))  # fmt: skip
    a, b = catalog.upstreams_for("dubhe-fast")
    assert (a.weight, a.priority, a.vision, a.multiple_choices) == (1, 0, None, True)
    assert (b.weight, b.priority, b.first_byte_timeout_seconds, b.idle_timeout_seconds) == (
        3, 1, 5.0, 2.5
    )
    assert (b.context_window, b.vision, b.multiple_choices) == (200000, False, False)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('weight = 0', r"upstreams\.a\.weight must be a positive integer"),
        ('priority = -1', r"upstreams\.a\.priority must be an integer >= 0"),
        ('idle_timeout_seconds = "5"', r"upstreams\.a\.idle_timeout_seconds must be a number"),
        ('vision = "no"', r"upstreams\.a\.vision must be true or false"),
        ('wieght = 2', r"upstreams\.a has unknown fields: \['wieght'\]"),
        ('kind = "bedrock"', r"upstreams\.a\.kind must be one of"),
    ],
)
def test_bad_deployment_fields_name_the_file_the_entry_and_the_field(
    tmp_path: Path, entry: str, message: str
) -> None:
    config = write(tmp_path, f'[[upstreams]]\nname = "a"\nbase_url = "http://a/v1"\n{entry}\n')
    with pytest.raises(CatalogError, match=message) as refused:
        load_catalog(config)
    assert str(refused.value).startswith(f"{config}: ")


def test_the_bundled_model_serves_every_model_and_the_catalog_says_what_it_takes(
    tmp_path: Path,
) -> None:
    catalog = load_catalog(None, builtin_upstream="local")
    [bundled] = catalog.upstreams
    assert (bundled.kind, bundled.context_window, bundled.vision) == ("local", 8192, False)
    assert set(bundled.models) == set(catalog.models)
    for model in catalog.models.values():
        assert (model.context_window, model.vision, model.function_calling) == (8192, False, False)
    # An operator's own upstreams win, and the models keep their shipped limits.
    config = write(tmp_path, '[[upstreams]]\nname = "v"\nbase_url = "http://v/v1"\n'
                             'models = ["dubhe-fast"]\n')  # fmt: skip
    operated = load_catalog(config, builtin_upstream="local")
    assert [u.name for u in operated.upstreams] == ["v"]
    assert operated.models["dubhe-vision"].vision
    assert load_catalog(None).upstreams[0].kind == "sim"
