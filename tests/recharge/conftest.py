"""A ``dubhe serve`` with Stripe configured, a stand-in Stripe API, and money-test helpers.

The shared ``server`` fixture has no Stripe settings, so these tests start their own server on the
same database backends (``database_url``) with ``DUBHE_STRIPE_*`` set, and point the stripe
package at a small fake Stripe listening on a real port, which records what it was sent.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
import stripe
from sqlalchemy.ext.asyncio import AsyncEngine

from dubhe.database import create_engine
from tests.conftest import (
    Server,
    Sim,
    assert_clean_log,
    fetch_one,
    free_port,
    gateway_config,
    start_server,
)

COUNTERS = ("tokens_available", "tokens_reserved", "balance_uusd", "balance_reserved_uusd",
            "uncollected_uusd", "debt_uusd", "debt_tokens")


# -- a stand-in for api.stripe.com ----------------------------------------------------------------


@dataclass
class FakeStripe:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


def _handler(fake: FakeStripe) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            params = dict(parse_qsl(body, keep_blank_values=True))
            fake.requests.append({"path": self.path, "headers": dict(self.headers),
                                  "params": params})
            if self.path != "/v1/checkout/sessions":
                self._reply(404, {"error": {"message": "unknown path", "type": "invalid_request_error"}})
                return
            session_id = "cs_test_" + secrets.token_hex(12)
            self._reply(200, {
                "id": session_id,
                "object": "checkout.session",
                "mode": params.get("mode"),
                "amount_total": int(params.get("line_items[0][price_data][unit_amount]", 0)),
                "currency": "usd",
                "client_reference_id": params.get("client_reference_id"),
                "payment_status": "unpaid",
                "status": "open",
                "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            })

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("request-id", "req_fake")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[FakeStripe]:
    port = free_port()
    fake = FakeStripe(url=f"http://127.0.0.1:{port}")
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()


# -- the server under test --------------------------------------------------------------------------


@dataclass
class Shop:
    server: Server
    root: str  # the server's base URL without /v1
    webhook_secret: str
    fake_stripe: FakeStripe

    def cli(self, *args: str, check: bool = True) -> Any:
        return self.server.cli(*args, check=check)

    def new_user(self, plan: str = "free") -> tuple[str, str]:
        """(e-mail, API key) of a new user on ``plan``."""
        email = f"{plan}-{secrets.token_hex(5)}@example.com"
        return email, self.server.new_account(email, plan=plan)

    def show(self, email: str) -> dict[str, Any]:
        return json.loads(self.cli("users", "show", email).stdout)  # type: ignore[no-any-return]

    def sign(self, payload: bytes, secret: str | None = None, timestamp: int | None = None) -> str:
        return stripe.WebhookSignature.generate_signature_header(
            payload.decode(), secret or self.webhook_secret, timestamp
        )


@pytest.fixture(scope="session")
def shop(database_url: str, sims: dict[str, Sim], fake_stripe: FakeStripe,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    webhook_secret = "whsec_" + secrets.token_hex(16)
    server = start_server(
        tmp_path_factory.mktemp("shop"), database_url, gateway_config(sims, dead_port=free_port()),
        DUBHE_STRIPE_SECRET_KEY="sk_test_" + secrets.token_hex(12),
        DUBHE_STRIPE_WEBHOOK_SECRET=webhook_secret,
        DUBHE_STRIPE_API_BASE=fake_stripe.url,
        DUBHE_PUBLIC_URL="https://dubhe.example.com",
    )
    yield Shop(server, server.base_url.removesuffix("/v1"), webhook_secret, fake_stripe)
    server.running.stop()
    assert_clean_log(server)


@pytest.fixture(scope="session")
async def shop_db(shop: Shop) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(shop.server.database_url)
    yield engine
    await engine.dispose()


# -- money helpers ------------------------------------------------------------------------------------


async def user_id_of(db: AsyncEngine, email: str) -> int:
    row = await fetch_one(db, "SELECT id FROM users WHERE email = :e", e=email)
    assert row is not None, email
    return int(row["id"])


async def assert_ledger_matches(db: AsyncEngine, user_id: int) -> dict[str, int]:
    """The ledger's point: every account counter equals the sum of its deltas in the ledger.

    One statement, so one snapshot: the server's workers keep writing (leases, flushes)."""
    sums = ", ".join(f"(SELECT COALESCE(SUM({name}), 0) FROM ledger_entries WHERE user_id = :u) "
                     f"AS ledger_{name}" for name in COUNTERS)
    row = await fetch_one(db, f"SELECT {', '.join(COUNTERS)}, {sums} FROM accounts WHERE user_id = :u",
                          u=user_id)
    assert row is not None
    account = {name: int(row[name]) for name in COUNTERS}
    assert account == {name: int(row[f"ledger_{name}"]) for name in COUNTERS}
    assert all(value >= 0 for value in account.values())
    return account


def checkout_event(*, session_id: str, user_id: int, purpose: str, amount_cents: int,
                   plan: str | None = None, event_type: str = "checkout.session.completed",
                   event_id: str | None = None, payment_status: str = "paid",
                   amount_uusd: int | None = None, payment_intent: str | None = None) -> bytes:
    metadata = {"user_id": str(user_id), "purpose": purpose,
                "amount_uusd": str(amount_cents * 10_000 if amount_uusd is None else amount_uusd)}
    if plan is not None:
        metadata["plan"] = plan
    event = {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "type": event_type,
        "livemode": False,
        "created": 1_700_000_000,
        "data": {"object": {
            "id": session_id,
            "object": "checkout.session",
            "mode": "payment",
            "amount_total": amount_cents,
            "currency": "usd",
            "client_reference_id": str(user_id),
            "metadata": metadata,
            "payment_status": payment_status,
            "payment_intent": payment_intent,
            "status": "complete",
        }},
    }
    return json.dumps(event).encode()


def charge_refunded_event(*, payment_intent: str, charge_id: str, amount_cents: int,
                          refunded_cents: int, event_id: str | None = None) -> bytes:
    """``charge.refunded``: Stripe sends the charge, with the cumulative ``amount_refunded``."""
    event = {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "type": "charge.refunded",
        "livemode": False,
        "created": 1_700_000_100,
        "data": {"object": {
            "id": charge_id,
            "object": "charge",
            "amount": amount_cents,
            "amount_captured": amount_cents,
            "amount_refunded": refunded_cents,
            "currency": "usd",
            "paid": True,
            "payment_intent": payment_intent,
            "refunded": refunded_cents == amount_cents,
            "status": "succeeded",
        }},
    }
    return json.dumps(event).encode()


def dispute_event(*, event_type: str, payment_intent: str, charge_id: str, dispute_id: str,
                  amount_cents: int, status: str, event_id: str | None = None) -> bytes:
    """``charge.dispute.created`` / ``charge.dispute.closed``: Stripe sends the dispute."""
    event = {
        "id": event_id or "evt_" + secrets.token_hex(12),
        "object": "event",
        "type": event_type,
        "livemode": False,
        "created": 1_700_000_200,
        "data": {"object": {
            "id": dispute_id,
            "object": "dispute",
            "amount": amount_cents,
            "charge": charge_id,
            "currency": "usd",
            "payment_intent": payment_intent,
            "reason": "fraudulent",
            "status": status,
        }},
    }
    return json.dumps(event).encode()
