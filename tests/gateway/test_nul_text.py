"""A NUL character (U+0000) is refused with 400 ``invalid_text`` before any route reads it: in
a JSON body (raw or as the escape ``\\u0000``) or a query string. PostgreSQL's text refuses it,
and a sign-up with one in its email was a 500 there (the connection then reset); SQLite's JSON
functions end a string at it. Real server, both databases."""

from __future__ import annotations

import httpx

from tests.conftest import Server


def test_a_nul_anywhere_in_the_request_is_a_400(server: Server) -> None:
    root = server.base_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=30) as client:
        token = client.get("/api/auth/session").json()["csrf_token"]
        refused = [
            client.post("/api/auth/signup", headers={"x-csrf-token": token},
                        json={"email": "a\u0000b@example.com", "password": "correct-horse-battery"}),
            client.post("/api/auth/login", headers={"x-csrf-token": token,
                                                    "content-type": "application/json"},
                        content=b'{"email": "a@example.com", "password": "x\x00y"}'),
            client.get("/api/usage/requests?model=dubhe%00fast",
                       headers={"authorization": f"Bearer {server.key('free')}"}),
        ]
        for response in refused:
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_text"
            assert response.headers["x-request-id"].startswith("req_")
        # An escaped backslash before "u0000" is text, not a NUL: it reaches the route.
        login = client.post("/api/auth/login", headers={"x-csrf-token": token},
                            json={"email": "nobody@example.com", "password": "\\u0000"})
        assert login.status_code == 401, login.text
        assert client.get("/healthz").status_code == 200
    assert "Traceback" not in server.running.log.read_text()
