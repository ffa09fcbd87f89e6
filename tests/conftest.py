"""Fixtures that run Dubhe the way an operator does: real processes, real databases, real HTTP.

Each session starts two ``dubhe upstream-sim`` processes (one as fast as possible, one paced) and,
for each database backend, one ``dubhe serve`` process configured to use them. Gateway tests run
once per backend: ``sqlite`` (a file in a temp dir) and ``postgresql`` (a fresh database on the
local server, dropped afterwards).
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import httpx
import httpx2
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.database import create_engine
from tests.upstreams.realistic import Realistic, start_realistic

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POSTGRES_ADMIN_URL = os.environ.get(
    "DUBHE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def _one_default_ssl_context(create: Any) -> Any:
    """``create_ssl_context`` that builds the default context (certifi's CA bundle, ~40 ms of
    CPU) once and hands the same one to every later client. Every ``httpx.get()``, httpx client
    and OpenAI client built its own: ~3,900 in a run of the suite, all for plain HTTP to
    localhost, 150 s of CPU. Any other ``verify`` or ``cert`` is built as asked."""
    built: dict[bool, ssl.SSLContext] = {}

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None:
            return create(verify=verify, cert=cert, trust_env=trust_env)
        if trust_env not in built:
            built[trust_env] = create(verify=True, cert=None, trust_env=trust_env)
        return built[trust_env]

    return create_ssl_context


for _transports in (httpx._transports.default, httpx2._transports.default):
    _transports.create_ssl_context = _one_default_ssl_context(  # type: ignore[attr-defined]
        _transports.create_ssl_context)  # type: ignore[attr-defined]

# Async HTTP clients (httpx's, and the OpenAI SDK's on httpx2) a test body made, with the loop
# they run on; any still open when the test ends is closed then (``pytest_runtest_call``).
_made_in_test: list[tuple[asyncio.AbstractEventLoop, Any]] | None = None


def _noted(init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _made_in_test is not None:
            try:
                _made_in_test.append((asyncio.get_running_loop(), self))
            except RuntimeError:  # made outside any loop: whoever made it closes it
                pass

    return __init__


for _module in (httpx, httpx2):
    _module.AsyncClient.__init__ = _noted(  # type: ignore[method-assign]
        _module.AsyncClient.__init__)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Close the async clients a test left open, on the loop they were made on. The tests share
    one event loop (pyproject: session scope), and an earlier test's open clients once kept a
    later test's client from ever reading 50 answers its kernel had received (the scale tests,
    13 runs of 13 on a loaded machine; all passed once the clients were closed; how they did it
    was not pinned down). A fixture's clients are its own to close."""
    global _made_in_test
    _made_in_test = []
    try:
        yield
    finally:
        made, _made_in_test = _made_in_test, None
        for loop, client in made:
            if not client.is_closed and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(client.aclose())


ALL_MODELS = ["dubhe-fast", "dubhe-vision", "dubhe-reasoning", "dubhe-code", "dubhe-agent", "dubhe-qwen"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pids_running(*words: bytes) -> list[int]:
    """The processes whose command line has every one of ``words`` among its arguments."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(word in argv for word in words):
            found.append(int(entry.name))
    return found


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Generous: on the shared 2-core box a cold start under load takes tens of seconds. A process
    that does not come up is killed, so a failed fixture leaves nothing running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{log.read_text()}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()}")


@dataclass
class RunningProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_process(args: list[str], log: Path, env: dict[str, str] | None = None) -> RunningProcess:
    handle = log.open("wb")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return RunningProcess(process, log)


@dataclass
class Sim:
    base_url: str  # ends in /v1
    running: RunningProcess

    def stats(self) -> dict[str, int]:
        root = self.base_url.removesuffix("/v1")
        return httpx.get(f"{root}/sim/stats").json()  # type: ignore[no-any-return]


def _start_sim(tmp: Path, name: str, *extra: str) -> Sim:
    port = free_port()
    log = tmp / f"{name}.log"
    running = start_process(
        [str(BIN / "dubhe"), "upstream-sim", "--port", str(port), *extra], log
    )
    wait_until_up(f"http://127.0.0.1:{port}/sim/stats", running.process, log)
    return Sim(f"http://127.0.0.1:{port}/v1", running)


@pytest.fixture(scope="session")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    tmp = tmp_path_factory.mktemp("sims")
    started = {"fast": _start_sim(tmp, "sim-fast"), "paced": _start_sim(tmp, "sim-paced", "--tokens-per-second", "40")}
    yield started
    for sim in started.values():
        sim.running.stop()


@pytest.fixture(scope="session")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realistic]:
    """The realistic, fault-injecting upstream (tests/upstreams/realistic.py), its own process."""
    upstream = start_realistic(tmp_path_factory.mktemp("realistic") / "realistic.log")
    yield upstream
    upstream.stop()


@contextmanager
def fresh_database(kind: str, tmp: Path) -> Iterator[str]:
    """A new, empty database of ``kind`` (a SQLite file, or a PostgreSQL database dropped after)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp / 'dubhe.db'}"
        return
    name = f"dubhe_test_{secrets.token_hex(6)}"
    run_psql(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        run_psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


def run_psql(statement: str) -> None:
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@dataclass
class Server:
    base_url: str  # ends in /v1
    env: dict[str, str]
    database_url: str
    data_dir: Path
    running: RunningProcess
    keys: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "dubhe"), *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dubhe {' '.join(args)} failed: {result.stderr}")
        return result

    def new_key(self, plan: str) -> str:
        """A new user on ``plan`` with one key."""
        return self.new_account(f"{plan}-{secrets.token_hex(4)}@example.com", plan=plan)

    def new_account(self, email: str, *, plan: str | None = None) -> str:
        """A new user with one key (returned), made the way ``dubhe users create`` and ``dubhe
        keys create`` make them (see ``create_account``)."""
        return create_account(self.env, email, plan=plan)

    def key(self, plan: str) -> str:
        if plan not in self.keys:
            self.keys[plan] = self.new_key(plan)
        return self.keys[plan]


# -- accounts made in this process -------------------------------------------------------------
# A `dubhe` CLI call costs 0.5-0.8 s of CPU (a Python start, SQLAlchemy's import and, for a user,
# the password's hash): the suite made ~550 of them only to have a user and a key, a third of its
# CPU on 2 cores. Fixtures that need an account make it here instead, in the test's own process,
# with the functions the CLI calls, against the server's own database and secret
# (tests/unit/test_cli*.py test the CLI itself).

PASSWORD = "correct-horse-battery"
_T = TypeVar("_T")
_aside: asyncio.AbstractEventLoop | None = None
_aside_lock = threading.Lock()


def run_aside(work: Coroutine[Any, Any, _T], timeout: float = 180) -> _T:
    """``work`` run to its end on this process's own background event loop: callable from a
    synchronous test and from a coroutine (whose loop waits, as it waits for a subprocess)."""
    global _aside
    with _aside_lock:
        if _aside is None:
            _aside = asyncio.new_event_loop()
            threading.Thread(target=_aside.run_forever, name="aside", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(work, _aside).result(timeout)


@functools.cache
def _password_hash(password: str) -> str:
    from dubhe.accounts.passwords import hash_password

    return hash_password(password)


async def new_user_key(sessionmaker: Any, secret: bytes, *, email: str | None = None,
                       catalog: Any = None, plan: str | None = None,
                       password: str = "a long password") -> Any:
    """A new user (a random e-mail, the default catalog and plan unless given) and one API key
    keyed with ``secret`` (the ``CreatedKey``: ``.secret`` is the key itself), in one
    transaction on ``sessionmaker``'s database."""
    from dubhe.accounts.service import create_user
    from dubhe.catalog import load_catalog
    from dubhe.keys.service import create_key

    email = email or f"{secrets.token_hex(4)}@example.com"
    catalog = catalog or load_catalog(Path("/nonexistent/dubhe.toml"))
    async with sessionmaker() as session, session.begin():
        # The suite's hundreds of users share a few passwords: each is hashed once per process
        # (argon2id, ~0.25 s of CPU) and its hash reused, salt and all.
        with mock.patch("dubhe.accounts.service.hash_password", _password_hash):
            await create_user(session, email, password, catalog=catalog, plan=plan)
        return await create_key(session, email, secret=secret)


def create_account(env: Mapping[str, str], email: str, *, plan: str | None = None,
                   password: str = PASSWORD) -> str:
    """A user and one API key (returned) in one transaction, for the server whose environment
    is ``env``: its database, catalog and secret."""
    from dubhe.catalog import load_catalog
    from dubhe.database import create_sessionmaker
    from dubhe.settings import Settings

    prefix = "DUBHE_"
    settings = Settings(**{
        name[len(prefix):].lower(): value for name, value in env.items()
        if name.startswith(prefix) and name[len(prefix):].lower() in Settings.__annotations__})
    catalog = load_catalog(settings.config, builtin_upstream=settings.builtin_upstream)

    async def work() -> str:
        engine = create_engine(settings.resolved_database_url)
        try:
            created = await new_user_key(create_sessionmaker(engine), settings.resolved_secret,
                                         email=email, catalog=catalog, plan=plan,
                                         password=password)
            return str(created.secret)
        finally:
            await engine.dispose()

    return run_aside(work())


def gateway_config(sims: dict[str, Sim], dead_port: int) -> str:
    return f"""
[defaults]
max_request_bytes = 1_000_000

[models.dubhe-agent]
status = "maintenance"

[[upstreams]]
name = "fast"
kind = "openai"
base_url = "{sims['fast'].base_url}"
models = ["dubhe-fast", "dubhe-vision", "dubhe-reasoning"]

[[upstreams]]
name = "paced"
kind = "openai"
base_url = "{sims['paced'].base_url}"
models = ["dubhe-code", "dubhe-agent"]
model_map = {{ "dubhe-code" = "qwen2.5-coder-7b" }}

[[upstreams]]
name = "dead"
kind = "openai"
base_url = "http://127.0.0.1:{dead_port}/v1"
models = ["dubhe-qwen"]
{ROOMY_LIMITS}"""


# The shared servers' tests share a few keys and are not about rate limits (tests/scale is): the
# shipped plans' limits are lifted far above what the suite sends.
ROOMY_LIMITS = "".join(
    f"""
[plans.{plan}]
requests_per_minute = 1_000_000
tokens_per_minute = 1_000_000_000
concurrent_requests = 10_000
"""
    for plan in ("free", "starter", "pro", "ultimate")
)


def start_server(data_dir: Path, database_url: str, config: str, *args: str, workers: int = 1,
                 **extra_env: str) -> Server:
    """``dubhe serve`` as its own process, on ``database_url``, with ``config`` as its dubhe.toml;
    ``args`` are added to its command line."""
    (data_dir / "dubhe.toml").write_text(config)
    env = {
        **os.environ,
        "DUBHE_DATA_DIR": str(data_dir),
        "DUBHE_DATABASE_URL": database_url,
        "DUBHE_CONFIG": str(data_dir / "dubhe.toml"),
        "DUBHE_LOG_LEVEL": "warning",
        **extra_env,
    }
    port = free_port()
    log = data_dir / "serve.log"
    running = start_process([str(BIN / "dubhe"), "serve", "--port", str(port),
                             "--workers", str(workers), *args], log, env)
    try:
        # Generous: on a loaded 2-core machine a worker can take tens of seconds to import and
        # start.
        wait_until_up(f"http://127.0.0.1:{port}/healthz", running.process, log, timeout=300)
    except BaseException:
        running.stop()  # a server that came up late must not outlive the failed test
        raise
    return Server(f"http://127.0.0.1:{port}/v1", env, database_url, data_dir, running)


def assert_clean_log(server: Server) -> None:
    text = server.running.log.read_text()
    assert "Traceback" not in text, f"the server logged errors:\n{text}"


@pytest.fixture(scope="session")
def server(
    database_url: str, sims: dict[str, Sim], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("data")
    running = start_server(data_dir, database_url, gateway_config(sims, dead_port=free_port()))
    yield running
    running.running.stop()
    assert_clean_log(running)


@pytest.fixture(scope="session")
async def db(server: Server) -> AsyncIterator[AsyncEngine]:
    """The server's own database, for checking what it wrote."""
    engine = create_engine(server.database_url)
    yield engine
    await engine.dispose()


async def fetch_one(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).mappings().first()


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as connection:
        await connection.execute(text(sql), params)


async def wait_for_row(engine: AsyncEngine, sql: str, timeout: float = 5, **params: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        row = await fetch_one(engine, sql, **params)
        if row is not None or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.05)
