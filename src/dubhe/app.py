"""The ASGI application: ``/v1`` goes to the raw-ASGI gateway, everything else to the web app
(FastAPI: the ``/api`` JSON API, later the dashboard).

One instance per worker process. Startup opens the database engine, the upstream session, the key
cache and the meter; shutdown writes what the meter still has queued before closing them.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from fastapi import FastAPI

from dubhe.billing.meter import Meter
from dubhe.catalog import Catalog, load_catalog
from dubhe.database import create_engine, create_read_sessionmaker, create_sessionmaker
from dubhe.gateway.app import GatewayApp, GatewayState
from dubhe.gateway.asgi import Receive, Scope, Send, new_request_id, send_error, send_json
from dubhe.gateway.models_list import ModelListings
from dubhe.keys.cache import KeyCache
from dubhe.providers import UpstreamPool
from dubhe.ratelimit import UnauthenticatedLimiter
from dubhe.server import Cors, declared_too_large, limited_receive, request_too_large
from dubhe.settings import Settings, load_settings
from dubhe.web import WebState, create_web_app

log = logging.getLogger(__name__)


class DubheApp:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = create_engine(settings.resolved_database_url)
        self.sessionmaker = create_sessionmaker(self.engine)
        self.read_sessionmaker = create_read_sessionmaker(self.engine)
        self.gateway: GatewayApp | None = None
        self.web: FastAPI | None = None
        self._state: GatewayState | None = None
        self.unauthenticated = UnauthenticatedLimiter(
            per_minute=settings.unauthenticated_per_minute, burst=settings.unauthenticated_burst
        )
        self.cors = Cors(settings.cors_origins) if settings.cors_origins else None
        self.max_request_bytes = catalog.max_request_bytes

    async def startup(self) -> None:
        if self.settings.stripe_secret_key or self.settings.stripe_webhook_secret:
            # ~25 MB and a second of CPU: only where payments are configured, and now rather
            # than on the event loop at the first payment.
            import stripe  # noqa: F401
        keys = KeyCache(self.read_sessionmaker, self.settings.resolved_secret)
        upstreams = UpstreamPool(self.catalog)
        await upstreams.start()
        meter = Meter(self.sessionmaker, self.catalog, self.settings.data_dir / "spool",
                      read_sessionmaker=self.read_sessionmaker)
        meter.start()
        await keys.load()
        keys.start()
        self._state = GatewayState(
            catalog=self.catalog,
            keys=keys,
            upstreams=upstreams,
            meter=meter,
            listings=ModelListings(self.catalog),
            unauthenticated=self.unauthenticated,
        )
        self.gateway = GatewayApp(self._state)
        # Everything built so far lives as long as the worker: keep it out of the collector's
        # generations, and collect the young one less often (a request allocates many small,
        # short-lived objects; each collection pauses every request in flight).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        # The web app shares the worker's key cache, so /api sees a revocation or a plan
        # change at the same moment /v1 does.
        self.web = create_web_app(WebState(settings=self.settings, catalog=self.catalog,
                                           sessionmaker=self.sessionmaker, keys=keys,
                                           unauthenticated=self.unauthenticated,
                                           upstreams=upstreams))

    async def shutdown(self) -> None:
        if self._state is not None:
            await self._state.keys.stop()
            await self._state.meter.stop()
            await self._state.upstreams.close()
        await self.engine.dispose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                assert self.gateway is not None
                if self.cors is not None:
                    if await self.cors.preflight(scope, send):
                        return
                    send = self.cors.wrap(scope, send)
                if declared_too_large(scope, self.max_request_bytes):
                    await send_error(send, request_too_large(self.max_request_bytes),
                                     new_request_id())
                    return
                await self.gateway(scope, receive, send)
            elif path == "/healthz":
                await send_json(send, 200, b'{"status":"ok"}', new_request_id())
            else:
                assert self.web is not None
                limit = (self.settings.webhook_max_body_bytes if path == "/api/stripe/webhook"
                         else self.settings.api_max_body_bytes)
                if declared_too_large(scope, limit):
                    await send_error(send, request_too_large(limit), new_request_id())
                    return
                await self.web(scope, limited_receive(receive, limit), send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings | None = None, catalog: Any = None) -> DubheApp:
    """The uvicorn factory: settings from the environment, the catalog from DUBHE_CONFIG."""
    settings = settings or load_settings()
    return DubheApp(
        settings,
        catalog or load_catalog(settings.config, builtin_upstream=settings.builtin_upstream),
    )
