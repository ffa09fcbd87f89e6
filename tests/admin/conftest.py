"""The admin console and the help chat under test: the web product's server (``dubhe serve
--workers 2``), clients and browser from tests/web, plus an admin made with the operator CLI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.web.conftest import (  # noqa: F401  (fixtures, re-exported for this folder)
    PASSWORD,
    WebClient,
    WebServer,
    browser,
    mailbox,
    new_context,
    new_email,
    web,
)


def make_admin(server: WebServer) -> str:
    email = new_email("admin")
    server.cli("users", "create", email, "--password", PASSWORD, "--admin")
    return email


@pytest.fixture(scope="module")
def admin_email(web: WebServer) -> str:  # noqa: F811
    return make_admin(web)


@pytest.fixture
def admin(web: WebServer, admin_email: str) -> Iterator[WebClient]:  # noqa: F811
    with web.client() as client:
        assert client.log_in(admin_email).status_code == 200
        yield client
