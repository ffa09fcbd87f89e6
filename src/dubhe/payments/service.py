"""Stripe Checkout: create a session for a top-up or a plan, and apply its paid webhook once.

The webhook is Stripe's word that money arrived, so it is trusted only once its
``Stripe-Signature`` verifies against the endpoint secret. A paid Checkout Session is applied
exactly once however Stripe delivers it: the same event redelivered, several deliveries at the
same instant, or two different events for one session (``checkout.session.completed`` and
``checkout.session.async_payment_succeeded``). The key of that "once" is the Checkout Session id,
stored as the payment's provider id under the ``payments`` table's unique (provider, event_id);
the payment row, the balance credit or plan change, and its ledger entry commit together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing import service as billing
from dubhe.billing.pricing import format_usd
from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import UUSD_PER_CENT, CheckoutIn, CheckoutOut, parse_usd
from dubhe.catalog import Catalog
from dubhe.errors import (
    DubheError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnprocessableRequest,
    UpstreamUnreachable,
)
from dubhe.payments.repository import PaymentRepository
from dubhe.settings import Settings

log = logging.getLogger(__name__)

PROVIDER = "stripe"
PAID_EVENTS = frozenset({"checkout.session.completed", "checkout.session.async_payment_succeeded"})
# Stripe's own bounds for a USD charge: at least $0.50, at most $999,999.99.
_MIN_CHARGE_CENTS, _MAX_CHARGE_CENTS = 50, 99_999_999


# -- checkout -----------------------------------------------------------------------------------


def checkout_params(settings: Settings, catalog: Catalog, *, user_id: int, current_plan: str,
                    order: CheckoutIn) -> dict[str, Any]:
    """The Checkout Session to create: one USD line item; what it buys travels in metadata."""
    if order.purpose == "topup":
        if order.amount_usd is None:
            raise UnprocessableRequest("amount_usd is required for a top-up, e.g. \"10.00\"",
                                       param="amount_usd", code="missing_required_parameter")
        amount_uusd = parse_usd(order.amount_usd, param="amount_usd")
        if amount_uusd % UUSD_PER_CENT:
            raise UnprocessableRequest("amount_usd must be whole cents, e.g. \"10.25\"",
                                       param="amount_usd", code="invalid_value")
        product = "Dubhe balance top-up"
        metadata = {"purpose": "topup"}
    else:
        if order.plan is None:
            raise UnprocessableRequest("plan is required to buy a plan", param="plan",
                                       code="missing_required_parameter")
        wanted = catalog.plans.get(order.plan)
        if wanted is None:
            raise UnprocessableRequest(
                f"unknown plan {order.plan!r}; choose one of {', '.join(catalog.plans)}",
                param="plan", code="invalid_value",
            )
        current = catalog.plans.get(current_plan)
        if wanted.price_cents == 0 or (current is not None
                                       and wanted.price_cents <= current.price_cents):
            # Paying for the plan one already has, or a cheaper one, would buy nothing now:
            # downgrades are free and wait for the period's end.
            raise UnprocessableRequest(
                f"only an upgrade can be bought; you are on {current_plan!r} and "
                f"{order.plan!r} is not a more expensive plan",
                param="plan", code="invalid_value",
            )
        amount_uusd = wanted.price_cents * UUSD_PER_CENT
        product = f"Dubhe {wanted.name} plan"
        metadata = {"purpose": "plan", "plan": wanted.code}
    cents = amount_uusd // UUSD_PER_CENT
    if not _MIN_CHARGE_CENTS <= cents <= _MAX_CHARGE_CENTS:
        raise UnprocessableRequest(
            f"a card payment must be between {format_usd(_MIN_CHARGE_CENTS * UUSD_PER_CENT)} and "
            f"{format_usd(_MAX_CHARGE_CENTS * UUSD_PER_CENT)} USD",
            param="amount_usd", code="invalid_value",
        )
    public_url = settings.public_url.rstrip("/")
    return {
        "mode": "payment",
        "line_items": [{
            "quantity": 1,
            "price_data": {"currency": "usd", "unit_amount": cents,
                           "product_data": {"name": product}},
        }],
        "client_reference_id": str(user_id),
        "metadata": {"user_id": str(user_id), "amount_uusd": str(amount_uusd), **metadata},
        "success_url": f"{public_url}/billing?checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{public_url}/billing?checkout=cancelled",
    }


async def create_checkout(settings: Settings, catalog: Catalog, *, user_id: int,
                          current_plan: str, order: CheckoutIn) -> CheckoutOut:
    """Create the Checkout Session at Stripe. No database work: nothing is owed until the
    webhook says it was paid, and no transaction stays open across the call to Stripe."""
    if settings.stripe_secret_key is None or not settings.stripe_secret_key.get_secret_value():
        raise ServiceUnavailable(
            "Card payments are not configured on this deployment (the operator sets "
            "DUBHE_STRIPE_SECRET_KEY); use a redemption code instead.",
            code="payments_not_configured",
        )
    params = checkout_params(settings, catalog, user_id=user_id, current_plan=current_plan,
                             order=order)
    import stripe  # loaded at start only where payments are configured (~25 MB; see DubheApp)
    # aiohttp is already a dependency; the stripe package picks httpx only if it is installed.
    http_client = stripe.AIOHTTPClient(timeout=30)
    client = stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        http_client=http_client,
        max_network_retries=2,
    )
    try:
        session = await client.v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
    except stripe.StripeError as exc:
        log.warning("creating a Stripe Checkout Session failed: %s", exc)
        raise UpstreamUnreachable(
            "The payment provider could not start a checkout; try again in a minute.",
            code="payment_provider_error",
        ) from exc
    finally:
        await http_client.close_async()
    return CheckoutOut(id=session.id, url=session.url)


# -- webhook --------------------------------------------------------------------------------------


def verify_event(settings: Settings, payload: bytes, signature: str | None) -> dict[str, Any]:
    """The event, if Stripe signed it with this endpoint's secret (and recently: 5 minutes)."""
    if settings.stripe_webhook_secret is None or not settings.stripe_webhook_secret.get_secret_value():
        raise ServiceUnavailable(
            "The Stripe webhook is not configured on this deployment (DUBHE_STRIPE_WEBHOOK_SECRET).",
            code="payments_not_configured",
        )
    import stripe

    try:
        stripe.WebhookSignature.verify_header(
            payload, signature, settings.stripe_webhook_secret.get_secret_value(),
            tolerance=stripe.Webhook.DEFAULT_TOLERANCE,
        )
    except stripe.SignatureVerificationError as exc:
        raise InvalidRequest("The Stripe-Signature header does not verify.",
                             code="invalid_signature") from exc
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:  # signed but not JSON: not from Stripe
        raise InvalidRequest("The webhook body is not JSON.", code="invalid_json") from exc
    if not isinstance(event, dict):
        raise InvalidRequest("The webhook body is not a JSON object.", code="invalid_json")
    return event


async def apply_event(session: AsyncSession, event: dict[str, Any], *, catalog: Catalog,
                      now: datetime) -> bool:
    """Apply a verified event in the caller's transaction; True if it changed anything."""
    if event.get("type") not in PAID_EVENTS:
        return False  # other events are acknowledged and ignored
    checkout = (event.get("data") or {}).get("object") or {}
    metadata = checkout.get("metadata") or {}
    if metadata.get("purpose") not in ("topup", "plan"):
        return False  # a session this deployment did not create (the Stripe account is shared)
    if checkout.get("payment_status") != "paid":
        return False  # e.g. a bank debit still pending: async_payment_succeeded follows
    paid = _PaidCheckout.parse(event, checkout, metadata)
    repository = BillingRepository.from_session(session)
    if await repository.plan_of_user(paid.user_id) is None:
        raise NotFound(f"Checkout Session {paid.session_id} is for user {paid.user_id}, who does "
                       "not exist.", code="user_not_found")
    if not await PaymentRepository.from_session(session).record(
        provider=PROVIDER, payment_id=paid.session_id, user_id=paid.user_id,
        purpose=paid.purpose, amount_uusd=paid.amount_uusd, plan_code=paid.plan_code, now=now,
    ):
        return False  # already applied, by this event or another one for the same session
    if paid.purpose == "topup":
        await billing.credit_balance(
            repository, user_id=paid.user_id, amount_uusd=paid.amount_uusd, kind="topup",
            ref=paid.session_id, description=f"card top-up ({PROVIDER} {paid.session_id})",
            catalog=catalog, now=now,
        )
    elif paid.plan_code is not None:
        await billing.change_plan(repository, user_id=paid.user_id, plan_code=paid.plan_code,
                                  catalog=catalog, now=now, ref=paid.session_id)
    log.info("applied %s payment %s for user %d (%s USD)", paid.purpose, paid.session_id,
             paid.user_id, format_usd(paid.amount_uusd))
    return True


@dataclass(frozen=True, slots=True)
class _PaidCheckout:
    session_id: str
    user_id: int
    purpose: str  # topup | plan
    amount_uusd: int
    plan_code: str | None

    @classmethod
    def parse(cls, event: dict[str, Any], checkout: dict[str, Any],
              metadata: dict[str, Any]) -> _PaidCheckout:
        """Cross-check what Stripe charged against what the session was created for: a
        mismatch is refused (nothing applied), so it shows as failing in Stripe's dashboard."""
        try:
            session_id = str(checkout["id"])
            user_id = int(metadata["user_id"])
            amount_uusd = int(metadata["amount_uusd"])
            amount_total = int(checkout["amount_total"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _refused(event, f"is missing {exc}") from exc
        if str(checkout.get("client_reference_id")) != str(user_id):
            raise _refused(event, "names two different users")
        if str(checkout.get("currency", "")).lower() != "usd":
            raise _refused(event, f"is in {checkout.get('currency')!r}, not USD")
        if amount_total * UUSD_PER_CENT != amount_uusd or amount_uusd <= 0:
            raise _refused(event, f"charged {amount_total} cents for {amount_uusd} µUSD")
        plan_code = metadata.get("plan") if metadata["purpose"] == "plan" else None
        if metadata["purpose"] == "plan" and not plan_code:
            raise _refused(event, "buys a plan but names none")
        return cls(session_id, user_id, str(metadata["purpose"]), amount_uusd, plan_code)


def _refused(event: dict[str, Any], why: str) -> DubheError:
    message = f"Stripe event {event.get('id')} {why}; nothing was applied."
    log.warning("%s", message)
    return UnprocessableRequest(message, code="payment_mismatch")
