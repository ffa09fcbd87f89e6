"""The ASGI application: ``/v1`` goes to the raw-ASGI gateway, everything else to the web app
(FastAPI: the ``/api`` JSON API, the dashboard and the admin console).

One instance per worker process. Startup opens the database engine, the upstream session, the key
cache and the meter; shutdown writes what the meter still has queued before closing them. The web
app is built on the first request outside ``/v1`` (FastAPI and the pages are about half of a
worker's start time and a fifth of its memory; a worker that serves only the API never loads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import text

from dubhe import metrics
from dubhe.admin.maintenance import MaintenanceBoard
from dubhe.billing.meter import Meter
from dubhe.catalog import Catalog, load_catalog
from dubhe.database import (
    create_engine,
    create_read_engine,
    create_read_sessionmaker,
    create_sessionmaker,
)
from dubhe.errors import DubheError, NotFound
from dubhe.gateway.app import GatewayApp, GatewayState
from dubhe.gateway.asgi import Receive, Scope, Send, new_request_id, send_error, send_json
from dubhe.gateway.models_list import ModelListings
from dubhe.keys.cache import KeyCache
from dubhe.migrations import head_revision
from dubhe.providers import UpstreamPool
from dubhe.pubsub import CHANGES, EPOCHS, RECALL, ChangeListener
from dubhe.ratelimit import LocalBudget, PlanLimiter, UnauthenticatedLimiter
from dubhe.routing import share_breakers
from dubhe.server import (
    Cors,
    declared_too_large,
    holds_nul,
    limited_receive,
    nul_in_request,
    read_ahead,
    request_too_large,
)
from dubhe.settings import Settings, load_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dubhe.gateway.ws import ChatSocketEndpoint
    from dubhe.ratelimit import RedisBudget

log = logging.getLogger(__name__)


class DubheApp:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = create_engine(settings.resolved_database_url)
        self.sessionmaker = create_sessionmaker(self.engine)
        self.read_engine = create_read_engine(settings.resolved_database_url)
        self.read_sessionmaker = create_read_sessionmaker(self.read_engine)
        self.gateway: GatewayApp | None = None
        self.chat_socket: ChatSocketEndpoint | None = None  # built on the first WebSocket
        self.web: FastAPI | None = None  # built on first use: self._web_app_future()
        self._web_building: asyncio.Future[FastAPI] | None = None
        self._upstreams: UpstreamPool | None = None
        self._state: GatewayState | None = None
        self._maintenance: MaintenanceBoard | None = None
        self._metrics_sync: asyncio.Future[None] | None = None
        self.unauthenticated = UnauthenticatedLimiter(
            per_minute=settings.unauthenticated_per_minute, burst=settings.unauthenticated_burst
        )
        self.cors = Cors(settings.cors_origins) if settings.cors_origins else None
        self.max_request_bytes = catalog.max_request_bytes
        self.budget: LocalBudget | RedisBudget = LocalBudget()  # RedisBudget when configured
        self.redis: RedisBudget | None = None
        self.listener: ChangeListener | None = None

    async def startup(self) -> None:
        self._metrics_sync = asyncio.ensure_future(metrics.every_second())
        if self.settings.access_log:
            _log_access_lines()
        if self.settings.stripe_secret_key or self.settings.stripe_webhook_secret:
            # ~25 MB and a second of CPU: only where payments are configured, and now rather
            # than on the event loop at the first payment. The Stripe client runs on aiohttp
            # (the gateway's own upstream client does not).
            import aiohttp  # noqa: F401
            import stripe  # noqa: F401
        keys = KeyCache(self.read_sessionmaker, self.settings.resolved_secret)
        upstreams = self._upstreams = UpstreamPool(self.catalog)
        await upstreams.start()
        meter = Meter(self.sessionmaker, self.catalog, self.settings.data_dir / "spool",
                      read_sessionmaker=self.read_sessionmaker)
        meter.start()
        await keys.load()
        keys.start()
        if self.settings.redis_url is not None:
            from dubhe.ratelimit import RedisBudget, redis_client

            self.budget = self.redis = RedisBudget(
                redis_client(self.settings.redis_url.get_secret_value()),
                prefix=self.settings.redis_prefix,
                fail_open=self.settings.redis_failure_policy == "open",
            )
            share_breakers(self.budget, {d.spec.name: d.breaker for d in upstreams.all})
            self.budget.start()
        else:
            self.budget = LocalBudget()
        limiter = PlanLimiter(self.budget)
        limiter.on_reject.append(lambda kind: metrics.RATE_LIMIT_REJECTIONS.labels(kind).inc())
        if self.redis is not None:
            self.redis.on_failure.append(metrics.REDIS_FAILURES.inc)
        self._state = GatewayState(
            catalog=self.catalog,
            keys=keys,
            upstreams=upstreams,
            meter=meter,
            listings=ModelListings(self.catalog),
            unauthenticated=self.unauthenticated,
            limits=limiter,
            access_log=self.settings.access_log,
        )
        self.gateway = GatewayApp(self._state)
        self._maintenance = MaintenanceBoard(self.read_sessionmaker, self._maintenance_changed)
        await self._maintenance.refresh()
        self._maintenance.start()
        database_url = self.settings.resolved_database_url
        if ChangeListener.supported(database_url):
            self.listener = self._listener(database_url, keys, meter, self._maintenance)
            self.listener.start()
        # Everything built so far lives as long as the worker: keep it out of the collector's
        # generations, and collect the young one less often (a request allocates many small,
        # short-lived objects; each collection pauses every request in flight). No collection
        # first: start-up leaves almost no cycles behind, and a full one costs ~60 ms of start.
        # The collector was off while the modules were imported (see dubhe.cli): on from here.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        gc.enable()

    def _web_app_future(self) -> asyncio.Future[FastAPI]:
        """The web app, built by the first request that needs it (``self.web`` once built). The
        imports run in a thread, so requests to /v1 keep being served meanwhile; requests
        outside /v1 that arrive during the build wait for it."""
        if self._web_building is None:
            self._web_building = asyncio.ensure_future(asyncio.to_thread(self._build_web_app))
            self._web_building.add_done_callback(self._web_built)
        return self._web_building

    def _web_built(self, building: asyncio.Future[FastAPI]) -> None:
        if not building.cancelled() and building.exception() is None:
            self.web = building.result()

    def _build_web_app(self) -> FastAPI:
        from dubhe.web import WebState, create_web_app

        assert self._state is not None
        # The web app shares the worker's key cache, so /api sees a revocation or a plan
        # change at the same moment /v1 does.
        web = create_web_app(WebState(settings=self.settings, catalog=self.catalog,
                                      sessionmaker=self.sessionmaker, keys=self._state.keys,
                                      unauthenticated=self.unauthenticated,
                                      read_sessionmaker=self.read_sessionmaker,
                                      upstreams=self._upstreams))
        # The help chat's automatic answer calls /v1 in process, through this very application.
        web.state.dubhe_asgi = self
        return web

    def _chat_socket(self) -> ChatSocketEndpoint:
        """The /v1/ws/chat endpoint, built by the first WebSocket (most workers never see one:
        its imports stay out of every worker's start)."""
        if self.chat_socket is None:
            from dubhe.gateway.ws import ChatSocketEndpoint, SocketLimits

            assert self._state is not None
            self.chat_socket = ChatSocketEndpoint(
                self._state, SocketLimits.from_settings(self.settings), self.settings.cors_origins
            )
        return self.chat_socket

    @staticmethod
    def _listener(database_url: str, keys: KeyCache, meter: Meter,
                  maintenance: MaintenanceBoard) -> ChangeListener:
        """One LISTEN connection per worker for every pushed change (``dubhe.pubsub``)."""
        listener = ChangeListener(database_url)

        def changed(table: str) -> None:
            if table == "model_maintenance":
                maintenance.wake()
            else:  # api_keys, users
                keys.changed()

        listener.subscribe(CHANGES, changed)
        listener.subscribe(EPOCHS, meter.epoch_moved)
        listener.subscribe(RECALL, meter.recalled)
        # What changed while this worker was not listening: the polls would see it, later.
        listener.on_connect(keys.changed)
        listener.on_connect(maintenance.wake)
        return listener

    def _maintenance_changed(self, models: frozenset[str]) -> None:
        assert self._state is not None
        self._state.maintenance = models
        self._state.listings.set_maintenance(models)

    async def shutdown(self) -> None:
        help_feed = getattr(self.web.state, "help_feed", None) if self.web is not None else None
        if help_feed is not None:
            await help_feed.stop()  # its answers are /v1 requests: metered, so stopped first
        if self._state is not None:
            # Money next: the spooled usage is written and every lease's unused credit returned
            # before anything that waits on another service (Redis, a listener) can hold the
            # worker up until its supervisor kills it.
            await self._state.meter.stop()
        if self._maintenance is not None:
            await self._maintenance.stop()
        if self._state is not None:
            await self._state.keys.stop()
            if self.listener is not None:
                await self.listener.stop()
            if self.redis is not None:
                await self.redis.stop()
            await self._state.upstreams.close()
        await self.engine.dispose()
        await self.read_engine.dispose()
        if self._metrics_sync is not None:
            self._metrics_sync.cancel()  # and syncs what is left
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_sync

    async def readiness(self) -> tuple[int, bytes]:
        """``/readyz``: the database answers and is at this code's migration head, and Redis
        (when configured) answers. 503 with the failed checks otherwise."""
        checks: dict[str, str] = {}
        try:
            async with self.engine.connect() as connection:
                rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
                versions = {str(row[0]) for row in rows}
            head = head_revision()
            checks["database"] = "ok"
            checks["migrations"] = ("ok" if head is None or versions == {head}
                                    else f"at {sorted(versions)}, code expects {head}")
        except Exception as exc:  # any failure is "not ready", never a 500
            checks["database"] = f"unreachable ({type(exc).__name__})"
        if self.redis is not None:
            checks["redis"] = "ok" if await self.redis.ping() else "unreachable"
        ready = all(value == "ok" for value in checks.values())
        body = orjson.dumps({"status": "ready" if ready else "not ready", "checks": checks})
        return (200 if ready else 503), body

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
            elif path == "/readyz":
                status, body = await self.readiness()
                await send_json(send, status, body, new_request_id())
            elif path == "/metrics":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", metrics.CONTENT_TYPE)]})
                await send({"type": "http.response.body", "body": metrics.scrape()})
            else:
                limit = (self.settings.webhook_max_body_bytes if path == "/api/stripe/webhook"
                         else self.settings.api_max_body_bytes)
                if declared_too_large(scope, limit):
                    await send_error(send, request_too_large(limit), new_request_id())
                    return
                if holds_nul(scope["query_string"], url_encoded=True) or "\x00" in scope["path"]:
                    await send_error(send, nul_in_request(), new_request_id())
                    return
                receive = limited_receive(receive, limit,
                                          refuse_nul=path != "/api/stripe/webhook")
                web = self.web
                if web is None:
                    # Waiting for the web app to be built: read the body meanwhile, as the web
                    # app would at once, so it is neither left to time out nor refused late.
                    building = self._web_app_future()
                    try:
                        receive = await read_ahead(receive)
                    except DubheError as error:  # request_too_large
                        await send_error(send, error, new_request_id())
                        return
                    web = await asyncio.shield(building)
                await web(scope, receive, send)
        elif kind == "websocket":
            if scope["path"] == "/v1/ws/chat":
                await self._chat_socket()(scope, receive, send)
            else:
                from dubhe.gateway.ws import deny

                await receive()  # websocket.connect
                await deny(send, NotFound(
                    f"Unknown WebSocket URL: {scope['path']}. The chat socket is /v1/ws/chat.",
                    code="unknown_url"), new_request_id())
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


def _log_access_lines() -> None:
    """The access log's JSON lines, alone on stdout (uvicorn configures only its own loggers)."""
    access = logging.getLogger("dubhe.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def create_app(settings: Settings | None = None, catalog: Any = None) -> DubheApp:
    """The uvicorn factory: settings from the environment, the catalog from DUBHE_CONFIG."""
    settings = settings or load_settings()
    return DubheApp(
        settings,
        catalog or load_catalog(settings.config, builtin_upstream=settings.builtin_upstream),
    )
