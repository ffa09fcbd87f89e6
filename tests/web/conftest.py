"""The web product under test: ``dubhe serve --workers 2`` on SQLite, a mail sink, a CSRF-aware
HTTP client and a Playwright browser (Debian's Chromium, headless; never ``playwright install``).

Every client and browser context gets its own made-up client address in ``X-Forwarded-For``
(uvicorn trusts it from 127.0.0.1), so the per-address sign-up and log-in limits that protect the
product hold for each test on its own and one test cannot use up another's allowance.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    BIN,
    RunningProcess,
    Server,
    Sim,
    assert_clean_log,
    free_port,
    fresh_database,
    gateway_config,
    start_process,
    wait_until_up,
)

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "correct-horse-battery"
SCREENSHOTS = Path(__file__).parent / "screenshots"


def random_ip() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


def new_email(tag: str = "user") -> str:
    return f"{tag}-{secrets.token_hex(5)}@example.com"


# -- a mail sink --------------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """What the server sent over SMTP, as parsed messages."""

    port: int
    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def wait_for(self, to: str, subject_contains: str = "", timeout: float = 15) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for message in self.messages:
                    if message["To"] == to and subject_contains in (message["Subject"] or ""):
                        return message
            time.sleep(0.05)
        raise AssertionError(f"no mail to {to} ({subject_contains!r}) within {timeout} s")

    def sent_to(self, to: str) -> list[Message]:
        with self.lock:
            return [message for message in self.messages if message["To"] == to]


def link_in(message: Message, path: str) -> str:
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    match = re.search(rf"https?://\S+{re.escape(path)}\?\S+", body.decode())
    assert match, body.decode()
    return match.group(0)


@pytest.fixture(scope="session")
def mailbox() -> Iterator[Mailbox]:
    from aiosmtpd.controller import Controller

    box = Mailbox(port=free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            with box.lock:
                box.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


# -- the server ---------------------------------------------------------------------------------------


@dataclass
class WebServer:
    server: Server
    root: str  # http://127.0.0.1:PORT

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def cli(self, *args: str, check: bool = True) -> Any:
        return self.server.cli(*args, check=check)

    def client(self, ip: str | None = None) -> WebClient:
        return WebClient(self.root, ip or random_ip())


def start_web_server(data_dir: Path, database_url: str, sims: dict[str, Sim], *, workers: int = 2,
                     **extra_env: str) -> Server:
    import os

    (data_dir / "dubhe.toml").write_text(gateway_config(sims, dead_port=free_port()))
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
    running: RunningProcess = start_process(
        [str(BIN / "dubhe"), "serve", "--port", str(port), "--workers", str(workers)], log, env
    )
    try:
        # Two workers importing everything on a busy 2-core machine can take a while.
        wait_until_up(f"http://127.0.0.1:{port}/healthz", running.process, log, timeout=120)
    except BaseException:
        running.stop()
        raise
    return Server(f"http://127.0.0.1:{port}/v1", env, database_url, data_dir, running)


@pytest.fixture(scope="session")
def web(sims: dict[str, Sim], mailbox: Mailbox,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """Two workers on SQLite, sign-up mode ``open``, mail to the sink (password reset)."""
    tmp = tmp_path_factory.mktemp("web")
    with fresh_database("sqlite", tmp) as url:
        server = start_web_server(tmp, url, sims, DUBHE_SIGNUP_MODE="open",
                                  DUBHE_SMTP_URL=mailbox.url)
        try:
            yield WebServer(server, server.base_url.removesuffix("/v1"))
        finally:
            server.running.stop()
        assert_clean_log(server)


# -- a CSRF-aware HTTP client ---------------------------------------------------------------------------


class WebClient:
    """A browser-like client: keeps cookies, sends the CSRF token the way pages and scripts do,
    and comes from its own client address."""

    def __init__(self, root: str, ip: str) -> None:
        self.ip = ip
        self.http = httpx.Client(base_url=root, headers={"x-forwarded-for": ip}, timeout=30,
                                 follow_redirects=False)

    def __enter__(self) -> WebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def csrf(self) -> str:
        """The token for this client's CSRF cookie (set by this call when missing)."""
        response = self.http.get("/api/auth/session")
        response.raise_for_status()
        return str(response.json()["csrf_token"])

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def api(self, method: str, path: str, json: Any = None, *, csrf: bool = True,
            **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if csrf:
            headers["x-csrf-token"] = self.csrf()
        return self.http.request(method, path, json=json, headers=headers, **kwargs)

    def form(self, path: str, data: dict[str, str], *, csrf: bool = True) -> httpx.Response:
        data = dict(data)
        if csrf:
            data["csrf_token"] = self.csrf()
        return self.http.post(path, data=data)

    def sign_up(self, email: str | None = None, password: str = PASSWORD) -> str:
        email = email or new_email()
        response = self.api("POST", "/api/auth/signup", {"email": email, "password": password})
        assert response.status_code == 201, response.text
        return email

    def log_in(self, email: str, password: str = PASSWORD) -> httpx.Response:
        return self.api("POST", "/api/auth/login", {"email": email, "password": password})

    def create_key(self, name: str = "test", **fields: Any) -> dict[str, Any]:
        response = self.api("POST", "/api/keys", {"name": name, **fields})
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]


# -- the browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()
    finally:
        playwright.stop()


@pytest.fixture
def new_context(browser: Any, web: WebServer) -> Iterator[Any]:
    """``new_context(**options)``: a fresh browser profile on the web server, from its own
    client address; closed after the test."""
    contexts: list[Any] = []

    def make(**options: Any) -> Any:
        headers = {"x-forwarded-for": random_ip(), **options.pop("extra_http_headers", {})}
        context = browser.new_context(base_url=web.root, extra_http_headers=headers, **options)
        context.set_default_timeout(15_000)
        # A worker builds its web app on its first page request (``DubheASGI._web_app_future``):
        # a second or two idle, several times that on a machine busy with the rest of the suite.
        context.set_default_navigation_timeout(60_000)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()


PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True,
         "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 900}}


def screenshot(page: Any, name: str) -> None:
    """Save ``page`` at its current width to tests/web/screenshots/NAME.png (gitignored)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_up_in_browser(page: Any, email: str | None = None, password: str = PASSWORD) -> str:
    email = email or new_email("browser")
    page.goto("/signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url("**/dashboard/keys")
    return email
