"""The deployments of every public model, over one keep-alive HTTP client per worker.

The client is Dubhe's own (``providers/http.py``): measured on this hardware aiohttp costs ~4x
its CPU per proxied request, and httpx ~10x aiohttp's. It has no connection cap: concurrency is
the rate limiter's job, which can answer 429 instead of making clients wait.

Each ``[[upstreams]]`` entry is one ``Upstream`` (a deployment) shared by the public models it
lists, with its own circuit breaker and timeouts, all built once at start: the hot path only
reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dubhe.catalog import Catalog, UpstreamSpec
from dubhe.providers.http import Endpoint, HttpClient, Timeouts
from dubhe.routing import Breaker

ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    spec: UpstreamSpec
    endpoint: Endpoint  # the chat URL with the fixed request headers, ready to send
    timeout: Timeouts
    first_byte_timeout: float
    breaker: Breaker

    def upstream_model(self, public_id: str) -> str:
        return self.spec.model_map.get(public_id, public_id)


def _headers(spec: UpstreamSpec) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    if spec.kind == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
        if api_key:
            headers["x-api-key"] = api_key
    elif api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _upstream(spec: UpstreamSpec, catalog: Catalog) -> Upstream:
    path = "/messages" if spec.kind == "anthropic" else "/chat/completions"
    first_byte = spec.first_byte_timeout_seconds or catalog.upstream_first_byte_timeout_seconds
    return Upstream(
        spec=spec,
        endpoint=Endpoint.parse(spec.base_url + path, _headers(spec)),
        timeout=Timeouts(
            connect=spec.connect_timeout_seconds or catalog.upstream_connect_timeout_seconds,
            # Between two reads of the answer (and, before it, for its status line).
            read=spec.idle_timeout_seconds or catalog.upstream_timeout_seconds,
            total=spec.total_timeout_seconds,
        ),
        first_byte_timeout=first_byte,
        breaker=Breaker(
            spec.name, failures=catalog.breaker_failures, cooldown=catalog.breaker_cooldown_seconds
        ),
    )


class UpstreamPool:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self.all = tuple(_upstream(spec, catalog) for spec in catalog.upstreams)
        by_model: dict[str, list[Upstream]] = {}
        for upstream in self.all:
            for model_id in upstream.spec.models:
                by_model.setdefault(model_id, []).append(upstream)
        # Sorted by priority tier, so the router walks the best tier first (stable: the file's
        # order within a tier).
        self._by_model = {
            model_id: tuple(sorted(deployments, key=lambda d: d.spec.priority))
            for model_id, deployments in by_model.items()
        }
        self.client: HttpClient | None = None

    async def start(self) -> None:
        self.client = HttpClient(keepalive_seconds=30)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    def for_model(self, model_id: str) -> tuple[Upstream, ...]:
        return self._by_model.get(model_id, ())
