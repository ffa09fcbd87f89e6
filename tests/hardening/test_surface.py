"""What every client sees before any business logic: authentication that costs little and is
rate-limited per address, security headers, CORS for /v1, and /api's edges answered as 4xx
envelopes (never a 500, a redirect, or a body read for an unauthenticated caller)."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

from dubhe.keys.format import generate_key
from tests.conftest import Server
from tests.hardening.conftest import SLACK, address, read_response

SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "referrer-policy": "strict-origin-when-cross-origin",
}


def root(server: Server) -> str:
    return server.base_url.removesuffix("/v1")


def envelope(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


# -- failed authentication, per address -------------------------------------------------------


def test_failed_authentication_is_rate_limited_per_address(hardened: Server) -> None:
    key = hardened.key("pro")
    limited = {"x-forwarded-for": "203.0.113.7"}  # a burst of 10, then 6 a minute
    with httpx.Client(base_url=root(hardened), timeout=SLACK) as client:
        statuses: list[int] = []
        while 429 not in statuses and len(statuses) < 30:
            response = client.get("/v1/models", headers={
                **limited, "authorization": f"Bearer {generate_key()}"})
            statuses.append(response.status_code)
        assert statuses[:10] == [401] * 10
        assert statuses[-1] == 429
        error = envelope(response)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert int(response.headers["retry-after"]) >= 1
        assert int(response.headers["retry-after-ms"]) >= 1

        # /api shares the limiter; a valid key from the same address is not limited.
        response = client.get("/api/account", headers={**limited, "authorization": "Bearer x"})
        assert response.status_code == 429
        response = client.get("/v1/models", headers={**limited, "authorization": f"Bearer {key}"})
        assert response.status_code == 200
        # Another address is not affected.
        response = client.get("/v1/models", headers={"x-forwarded-for": "203.0.113.8"})
        assert response.status_code == 401

    sdk = openai.OpenAI(base_url=hardened.base_url, api_key=generate_key(), max_retries=0,
                        default_headers=limited)
    with pytest.raises(openai.RateLimitError):
        sdk.models.list()


# -- headers ---------------------------------------------------------------------------------


def test_security_headers_on_every_kind_of_answer(hardened: Server) -> None:
    key = hardened.key("pro")
    with httpx.Client(base_url=root(hardened), timeout=SLACK) as client:
        answers = [
            client.get("/healthz"),
            client.get("/v1/models", headers={"authorization": f"Bearer {key}"}),
            client.get("/v1/nowhere"),
            client.get("/api/account", headers={"authorization": f"Bearer {key}"}),
            client.get("/api/nowhere"),
            client.get("/api/openapi.json"),
        ]
        for response in answers:
            for name, value in SECURITY.items():
                assert response.headers.get(name) == value, (response.url, name)
            assert "strict-transport-security" not in response.headers
        over_https = client.get("/api/account", headers={"authorization": f"Bearer {key}",
                                                         "x-forwarded-proto": "https"})
        assert over_https.headers["strict-transport-security"].startswith("max-age=")


def test_cors_for_allowed_origins_only(hardened: Server) -> None:
    key = hardened.key("pro")
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    with httpx.Client(base_url=root(hardened), timeout=SLACK) as client:
        allowed = client.options("/v1/chat/completions",
                                 headers={"origin": "https://app.example", **preflight})
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert allowed.headers["access-control-allow-headers"] == "authorization, content-type"

        refused = client.options("/v1/chat/completions",
                                 headers={"origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in refused.headers

        answer = client.post("/v1/chat/completions", headers={
            "origin": "https://other.example", "authorization": f"Bearer {key}"},
            json={"model": "dubhe-fast", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://other.example"
        assert "x-request-id" in answer.headers["access-control-expose-headers"]

        for origin in ({"origin": "https://evil.example"}, {}):
            answer = client.get("/v1/models", headers={"authorization": f"Bearer {key}",
                                                       **origin})
            assert answer.status_code == 200
            assert "access-control-allow-origin" not in answer.headers


# -- /api edges ------------------------------------------------------------------------------


def test_api_refuses_a_bad_key_before_reading_the_body(hardened: Server) -> None:
    # Headers only: a server that waited for the promised 4,000 bytes would answer 408.
    with socket.create_connection(address(hardened), timeout=SLACK) as sock:
        sock.sendall(b"POST /api/redeem HTTP/1.1\r\nHost: dubhe\r\nX-Forwarded-For: 198.51.100.1"
                     b"\r\nAuthorization: Bearer " + generate_key().encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n")
        response = read_response(sock)
    assert response.status == 401
    assert response.error()["code"] == "invalid_api_key"


def test_api_bodies_that_do_not_parse_are_400_invalid_request(hardened: Server) -> None:
    key = hardened.key("pro")
    with httpx.Client(base_url=root(hardened), timeout=SLACK) as client:
        for body in (b"\xff\xfe\x00", b"{not json", b"[1, 2"):
            response = client.post("/api/redeem", content=body, headers={
                "authorization": f"Bearer {key}", "content-type": "application/json"})
            assert response.status_code in (400, 422), response.text
            error = envelope(response)
            assert error["type"] == "invalid_request_error"


def test_a_trailing_slash_is_not_redirected(hardened: Server) -> None:
    key = hardened.key("pro")
    with httpx.Client(base_url=root(hardened), timeout=SLACK) as client:
        response = client.get("/api/account/", headers={"authorization": f"Bearer {key}",
                                                        "host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers
    assert envelope(response)["code"] == "unknown_url"


@pytest.mark.parametrize("path", ["/api/ledger", "/api/usage/requests", "/api/billing/statement"])
def test_a_cursor_beyond_bigint_is_422_and_the_connection_lives(hardened: Server,
                                                                path: str) -> None:
    key = hardened.key("pro")
    with httpx.Client(base_url=root(hardened), timeout=SLACK,
                      headers={"authorization": f"Bearer {key}"}) as client:
        for before in (2**63, 2**64 + 5, 10**30):
            response = client.get(path, params={"before": before})
            assert response.status_code == 422
            assert envelope(response)["param"] == "before"
        assert client.get(path, params={"before": 2**63 - 1}).status_code == 200


def test_the_webhook_reads_a_bounded_body_before_the_signature(hardened: Server) -> None:
    url = root(hardened) + "/api/stripe/webhook"
    with httpx.Client(timeout=SLACK) as client:
        declared = client.post(url, content=b"x" * 100_000,
                               headers={"stripe-signature": "t=1,v1=00"})
        assert declared.status_code == 400
        assert envelope(declared)["code"] == "request_too_large"

        def chunks():  # no Content-Length: refused while reading
            for _ in range(100):
                yield b"x" * 1000

        streamed = client.post(url, content=chunks(), headers={"stripe-signature": "t=1,v1=00"})
        assert streamed.status_code == 400
        assert envelope(streamed)["code"] == "request_too_large"

        small = client.post(url, content=b"{}", headers={"stripe-signature": "t=1,v1=00"})
        assert small.status_code == 400
        assert envelope(small)["code"] == "invalid_signature"
