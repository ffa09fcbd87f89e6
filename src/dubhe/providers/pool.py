"""The deployments of every public model, over one aiohttp session per worker.

aiohttp, not httpx: measured on this hardware httpx costs ~10x the CPU per proxied request and
its pool degrades with concurrency. The connector has no connection cap (``limit=0``): aiohttp's
default of 100 queues requests silently, and concurrency is the rate limiter's job, which can
answer 429 instead of making clients wait.

Each ``[[upstreams]]`` entry is one ``Upstream`` (a deployment) shared by the public models it
lists, with its own circuit breaker and timeouts, all built once at start: the hot path only
reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import aiohttp

from dubhe.catalog import Catalog, UpstreamSpec
from dubhe.routing import Breaker

ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    spec: UpstreamSpec
    chat_url: str
    headers: dict[str, str]
    timeout: aiohttp.ClientTimeout
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
        chat_url=spec.base_url + path,
        headers=_headers(spec),
        timeout=aiohttp.ClientTimeout(
            total=spec.total_timeout_seconds,
            connect=spec.connect_timeout_seconds or catalog.upstream_connect_timeout_seconds,
            # Between two reads of the answer (and, before it, for its status line).
            sock_read=spec.idle_timeout_seconds or catalog.upstream_timeout_seconds,
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
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self._catalog.upstream_connect_timeout_seconds,
                sock_read=self._catalog.upstream_timeout_seconds,
            ),
            # Pass bodies through untouched: no automatic decompression of upstream answers.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def for_model(self, model_id: str) -> tuple[Upstream, ...]:
        return self._by_model.get(model_id, ())
