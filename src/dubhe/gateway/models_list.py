"""``GET /v1/models`` and ``GET /v1/models/{id}``: what the caller's plan includes.

The answers are built once per plan at start, and again when an admin switches a model's
maintenance (``dubhe.admin.maintenance``): nothing is built per request.
"""

from __future__ import annotations

from typing import Any

import orjson

from dubhe.catalog import Catalog, ModelSpec
from dubhe.errors import NotFound


def model_object(model: ModelSpec, *, in_maintenance: bool = False) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "dubhe",
        "name": model.name,
        "context_window": model.context_window,
        "capabilities": {
            "streaming": model.streaming,
            "function_calling": model.function_calling,
            "vision": model.vision,
        },
        "status": "maintenance" if in_maintenance else model.status,
    }


class ModelListings:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._lists: dict[str, bytes] = {}
        self._one: dict[tuple[str, str], bytes] = {}
        self.set_maintenance(frozenset())

    def set_maintenance(self, in_maintenance: frozenset[str]) -> None:
        """Rebuild every answer with these models shown as ``status: "maintenance"``."""
        lists: dict[str, bytes] = {}
        one: dict[tuple[str, str], bytes] = {}
        for plan in self._catalog.plans.values():
            visible = [model for model_id, model in self._catalog.models.items()
                       if model_id in plan.models]
            objects = {model.id: model_object(model, in_maintenance=model.id in in_maintenance)
                       for model in visible}
            lists[plan.code] = orjson.dumps({"object": "list", "data": list(objects.values())})
            for model_id, body in objects.items():
                one[(plan.code, model_id)] = orjson.dumps(body)
        self._lists, self._one = lists, one

    def list_for(self, plan_code: str) -> bytes:
        return self._lists.get(plan_code, b'{"object":"list","data":[]}')

    def one_for(self, plan_code: str, model_id: str) -> bytes:
        body = self._one.get((plan_code, model_id))
        if body is None:
            raise NotFound(
                f"The model '{model_id}' does not exist or is not included in your plan. List "
                "the models you can use with GET /v1/models.",
                code="model_not_found",
                param="model",
            )
        return body
