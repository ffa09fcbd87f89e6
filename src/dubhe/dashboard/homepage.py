"""What the public homepage shows, built from the catalog and the deployment's settings, so an
operator's ``dubhe.toml`` (models, plans, prices) and ``DUBHE_PUBLIC_URL`` change it."""

from __future__ import annotations

from dataclasses import dataclass

from dubhe.billing.pricing import UUSD_PER_CENT
from dubhe.catalog import Catalog, ModelSpec, PlanSpec


@dataclass(frozen=True, slots=True)
class PlanRow:
    plan: PlanSpec
    price_uusd: int
    model_names: list[str]
    is_default: bool


@dataclass(frozen=True, slots=True)
class ModelCard:
    model: ModelSpec
    capabilities: list[str]
    plan_names: list[str]


@dataclass(frozen=True, slots=True)
class Homepage:
    api_base: str
    models: list[ModelCard]
    plans: list[PlanRow]
    # The model the code examples call: one the default plan includes, so they work as written
    # for a new account.
    example_model: str


def build_homepage(catalog: Catalog, public_url: str) -> Homepage:
    plans = sorted(catalog.plans.values(), key=lambda plan: (plan.price_cents, plan.code))
    cards = [
        ModelCard(
            model=model,
            capabilities=_capabilities(model),
            plan_names=[plan.name for plan in plans if model.id in plan.models],
        )
        for model in catalog.models.values()
    ]
    rows = [
        PlanRow(
            plan=plan,
            price_uusd=plan.price_cents * UUSD_PER_CENT,
            model_names=[m.name for m in catalog.models.values() if m.id in plan.models],
            is_default=plan.code == catalog.default_plan,
        )
        for plan in plans
    ]
    default_models = catalog.plans[catalog.default_plan].models
    example = next((m for m in catalog.models if m in default_models), next(iter(catalog.models), ""))
    return Homepage(
        api_base=public_url.rstrip("/") + "/v1", models=cards, plans=rows, example_model=example
    )


def _capabilities(model: ModelSpec) -> list[str]:
    flags = (("Streaming", model.streaming), ("Function calling", model.function_calling),
             ("Vision", model.vision))
    return [name for name, present in flags if present]
