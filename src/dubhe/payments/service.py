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
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from dubhe.billing import service as billing
from dubhe.billing.pricing import UUSD_PER_CENT, format_usd, parse_usd
from dubhe.billing.repository import BillingRepository
from dubhe.billing.schemas import CheckoutIn, CheckoutOut
from dubhe.catalog import Catalog
from dubhe.errors import (
    Conflict,
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
# Money going back: a refund, a dispute opened, a dispute closed (won gives the credit back).
REVERSAL_EVENTS = frozenset({"charge.refunded", "charge.dispute.created", "charge.dispute.closed"})
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
        if current is not None and wanted.price_cents <= current.price_cents:
            # Paying for the plan one already has, or a cheaper one, would buy nothing now:
            # downgrades are free and wait for the period's end.
            message = (f"You already have the {current.name} plan; only a more expensive plan "
                       "can be bought.")
            if wanted.code != current.code:
                message += (f" To move to {wanted.name} at the end of your period, change your "
                            "plan instead: downgrades are free.")
            raise Conflict(message, param="plan", code="plan_not_an_upgrade")
        if wanted.price_cents == 0:
            raise UnprocessableRequest(f"the {wanted.name} plan is free: nothing to pay for",
                                       param="plan", code="invalid_value")
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
        # stripe ships this coroutine without annotations.
        await http_client.close_async()  # type: ignore[no-untyped-call]
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
    """Apply a verified event in the caller's transaction; True if it changed anything.

    A signed event is still parsed as outside data: a field of the wrong type or a number out
    of range is refused with a 422 and logged (Stripe shows it as failing), never a 500."""
    kind = event.get("type")
    if not isinstance(kind, str):
        raise _refused(event, "has no type")
    if kind in PAID_EVENTS:
        return await _apply_checkout(session, event, catalog=catalog, now=now)
    if kind in REVERSAL_EVENTS:
        return await _apply_reversal(session, event, catalog=catalog, now=now)
    return False  # other events are acknowledged and ignored


async def _apply_checkout(session: AsyncSession, event: dict[str, Any], *, catalog: Catalog,
                          now: datetime) -> bool:
    checkout = _object_of(event)
    metadata = checkout.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("purpose") not in ("topup", "plan"):
        return False  # a session this deployment did not create (the Stripe account is shared)
    if checkout.get("payment_status") != "paid":
        return False  # e.g. a bank debit still pending: async_payment_succeeded follows
    paid = _PaidCheckout.parse(event, checkout, metadata)
    repository = BillingRepository.from_session(session)
    payments = PaymentRepository.from_session(session)
    if await repository.plan_of_user(paid.user_id) is None:
        raise NotFound(f"Checkout Session {paid.session_id} is for user {paid.user_id}, who does "
                       "not exist.", code="user_not_found")
    if paid.payment_intent is not None:
        await payments.lock_intent(provider=PROVIDER, payment_intent=paid.payment_intent,
                                   event_id=_event_id(event), now=now)
    if not await payments.record(
        provider=PROVIDER, payment_id=paid.session_id, user_id=paid.user_id,
        purpose=paid.purpose, amount_uusd=paid.amount_uusd, plan_code=paid.plan_code,
        payment_intent=paid.payment_intent, now=now,
    ):
        return False  # already applied, by this event or another one for the same session
    if paid.purpose == "topup":
        await billing.credit_balance(
            repository, user_id=paid.user_id, amount_uusd=paid.amount_uusd, kind="topup",
            ref=paid.session_id, description=f"card top-up ({PROVIDER} {paid.session_id})",
            catalog=catalog, now=now,
        )
    elif paid.plan_code is not None:
        outcome = await billing.buy_plan(repository, user_id=paid.user_id,
                                         plan_code=paid.plan_code, paid_uusd=paid.amount_uusd,
                                         ref=paid.session_id, catalog=catalog, now=now)
        if outcome is billing.PlanPurchase.CREDITED:
            log.warning("plan payment %s for user %d bought no upgrade; credited to the balance",
                        paid.session_id, paid.user_id)
    log.info("applied %s payment %s for user %d (%s USD)", paid.purpose, paid.session_id,
             paid.user_id, format_usd(paid.amount_uusd))
    if paid.payment_intent is not None:
        # A refund or dispute that arrived before this payment applies now.
        await _apply_reversals(session, paid.payment_intent, catalog=catalog, now=now)
    return True


async def _apply_reversal(session: AsyncSession, event: dict[str, Any], *, catalog: Catalog,
                          now: datetime) -> bool:
    """Store a refund or dispute as a fact of its payment intent, then apply what is known.

    Facts are stored whether or not the payment is known yet (webhooks arrive in any order) and
    each is applied once. Refunds carry Stripe's cumulative ``amount_refunded``: one fact per
    level, each taking back what the highest level adds, so a late, lower level takes nothing.
    A dispute closed in the merchant's favour is stored with the dispute itself, dispute first,
    so however the two events arrive, the credit is taken back once and given back once."""
    source = _object_of(event)
    payment_intent = source.get("payment_intent")
    if payment_intent is None:
        return False  # not a PaymentIntent's charge: Checkout always has one
    payment_intent = _id_field(event, source, "payment_intent")
    if str(source.get("currency", "")).lower() != "usd":
        return False  # not a charge this deployment makes
    facts: list[tuple[str, str, int]] = []  # (kind, ref, amount)
    if event["type"] == "charge.refunded":
        charge_id = _id_field(event, source, "id")
        refunded = _cents_field(event, source, "amount_refunded") * UUSD_PER_CENT
        facts.append(("refund", f"refund:{charge_id}:{refunded}", refunded))
    else:
        dispute_id = _id_field(event, source, "id")
        amount = _cents_field(event, source, "amount") * UUSD_PER_CENT
        status = source.get("status")
        if not isinstance(status, str) or status.startswith("warning_"):
            return False  # an inquiry: no money moved
        if event["type"] == "charge.dispute.created" or status == "lost":
            facts.append(("dispute", f"dispute:{dispute_id}", amount))
        elif status == "won":
            facts.append(("dispute", f"dispute:{dispute_id}", amount))
            facts.append(("dispute_won", f"dispute_won:{dispute_id}", amount))
        else:
            return False  # closed in another way that moves no money back
    payments = PaymentRepository.from_session(session)
    await payments.lock_intent(provider=PROVIDER, payment_intent=payment_intent,
                               event_id=_event_id(event), now=now)
    for kind, ref, amount in facts:
        await payments.add_reversal(provider=PROVIDER, ref=ref, kind=kind,
                                    payment_intent=payment_intent, amount_uusd=amount,
                                    event_id=_event_id(event), now=now)
    return await _apply_reversals(session, payment_intent, catalog=catalog, now=now)


async def _apply_reversals(session: AsyncSession, payment_intent: str, *, catalog: Catalog,
                           now: datetime) -> bool:
    """Apply the stored, unapplied refunds and disputes of a known payment (under its intent's
    lock, taken by the caller). A take-back never exceeds what the payment credited."""
    payments = PaymentRepository.from_session(session)
    payment = await payments.payment_of_intent(PROVIDER, payment_intent)
    if payment is None:
        return False  # applied when the payment arrives
    repository = BillingRepository.from_session(session)
    refunded, reversed_ = payment.refunded_uusd, payment.reversed_uusd
    changed = False
    for fact in await payments.unapplied_reversals(PROVIDER, payment_intent):
        ref = f"{payment.event_id}:{fact.id}"  # points at the payment (its Checkout Session)
        what = f"card payment {payment.event_id}"
        taken = billing.TakenBack(0, 0)
        if fact.kind == "dispute_won":
            dispute = await payments.reversal(PROVIDER, fact.ref.replace("dispute_won:", "dispute:", 1))
            if dispute is not None and dispute.applied_at is not None:
                taken = billing.TakenBack(dispute.applied_uusd, dispute.owed_uusd)
            if taken.taken_uusd + taken.owed_uusd:
                await billing.give_back(repository, user_id=payment.user_id, taken=taken,
                                        kind="dispute_won", ref=ref,
                                        description=f"dispute of {what} won: credit restored",
                                        catalog=catalog, now=now)
            reversed_ -= taken.taken_uusd + taken.owed_uusd
        else:
            if fact.kind == "refund":
                amount = max(0, fact.amount_uusd - refunded)
                refunded = max(refunded, fact.amount_uusd)
                description = f"refund of {what}: credit taken back"
            else:
                amount = fact.amount_uusd
                description = f"dispute of {what}: credit taken back"
            amount = min(amount, payment.amount_uusd - reversed_)
            if amount > 0:
                taken = await billing.take_back(repository, user_id=payment.user_id,
                                                amount_uusd=amount, kind=fact.kind, ref=ref,
                                                description=description, catalog=catalog, now=now)
            reversed_ += amount
        if not await payments.mark_applied(fact.id, applied_uusd=taken.taken_uusd,
                                           owed_uusd=taken.owed_uusd, now=now):
            raise RuntimeError(f"reversal {fact.id} applied twice under its intent's lock")
        changed = changed or bool(taken.taken_uusd + taken.owed_uusd)
        log.warning("%s of payment %s for user %d: %s USD taken back, %s USD owed", fact.kind,
                    payment.event_id, payment.user_id, format_usd(taken.taken_uusd),
                    format_usd(taken.owed_uusd))
    await payments.set_reversed(payment.id, refunded_uusd=refunded, reversed_uusd=reversed_)
    return changed


# -- the boundary: a signed event is still outside data ------------------------------------------

_MAX_USER_ID = 2**63 - 1
_STRIPE_ID = re.compile(r"[A-Za-z0-9_]{1,128}", re.ASCII)
_DECIMAL = re.compile(r"[0-9]{1,18}", re.ASCII)


def _event_id(event: dict[str, Any]) -> str:
    value = event.get("id")
    return value if isinstance(value, str) and _STRIPE_ID.fullmatch(value) else "evt_unknown"


def _object_of(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    source = data.get("object") if isinstance(data, dict) else None
    if not isinstance(source, dict):
        raise _refused(event, "has no data.object")
    return source


def _id_field(event: dict[str, Any], source: dict[str, Any], name: str) -> str:
    value = source.get(name)
    if not isinstance(value, str) or not _STRIPE_ID.fullmatch(value):
        raise _refused(event, f"has no valid {name}")
    return value


def _cents_field(event: dict[str, Any], source: dict[str, Any], name: str) -> int:
    value = source.get(name)
    if type(value) is not int or not 0 <= value <= _MAX_CHARGE_CENTS:
        raise _refused(event, f"has {name} {value!r}, not a whole number of cents in range")
    return value


def _decimal_metadata(event: dict[str, Any], metadata: dict[str, Any], name: str,
                      maximum: int) -> int:
    value = metadata.get(name)
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value) or not 0 < int(value) <= maximum:
        raise _refused(event, f"has metadata {name} {value!r}, not a number in range")
    return int(value)


@dataclass(frozen=True, slots=True)
class _PaidCheckout:
    session_id: str
    user_id: int
    purpose: str  # topup | plan
    amount_uusd: int
    plan_code: str | None
    payment_intent: str | None

    @classmethod
    def parse(cls, event: dict[str, Any], checkout: dict[str, Any],
              metadata: dict[str, Any]) -> _PaidCheckout:
        """Cross-check what Stripe charged against what the session was created for: a
        mismatch is refused (nothing applied), so it shows as failing in Stripe's dashboard."""
        session_id = _id_field(event, checkout, "id")
        user_id = _decimal_metadata(event, metadata, "user_id", _MAX_USER_ID)
        amount_uusd = _decimal_metadata(event, metadata, "amount_uusd",
                                        _MAX_CHARGE_CENTS * UUSD_PER_CENT)
        amount_total = _cents_field(event, checkout, "amount_total")
        payment_intent = (None if checkout.get("payment_intent") is None
                          else _id_field(event, checkout, "payment_intent"))
        if checkout.get("client_reference_id") != str(user_id):
            raise _refused(event, "names two different users")
        if str(checkout.get("currency", "")).lower() != "usd":
            raise _refused(event, f"is in {checkout.get('currency')!r}, not USD")
        if amount_total * UUSD_PER_CENT != amount_uusd:
            raise _refused(event, f"charged {amount_total} cents for {amount_uusd} µUSD")
        plan_code = metadata.get("plan") if metadata["purpose"] == "plan" else None
        if metadata["purpose"] == "plan" and (not isinstance(plan_code, str) or not plan_code
                                              or len(plan_code) > 32):
            raise _refused(event, "buys a plan but names none")
        return cls(session_id, user_id, str(metadata["purpose"]), amount_uusd, plan_code,
                   payment_intent)


def _refused(event: dict[str, Any], why: str) -> DubheError:
    message = f"Stripe event {_event_id(event)} {why}; nothing was applied."
    log.warning("%s", message)
    return UnprocessableRequest(message, code="payment_mismatch")
