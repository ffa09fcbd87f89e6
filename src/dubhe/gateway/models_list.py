"""``GET /v1/models`` and ``GET /v1/models/{id}``: what the caller's plan includes.

The answers are built once per plan at start: the catalog does not change while Dubhe runs.
"""

from __future__ import annotations

from typing import Any

import orjson

from dubhe.catalog import Catalog, ModelSpec
from dubhe.errors import NotFound


def model_object(model: ModelSpec) -> dict[str, Any]:
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
        "status": model.status,
    }


class ModelListings:
    def __init__(self, catalog: Catalog) -> None:
        self._lists: dict[str, bytes] = {}
        self._one: dict[tuple[str, str], bytes] = {}
        for plan in catalog.plans.values():
            visible = [model for model_id, model in catalog.models.items() if model_id in plan.models]
            self._lists[plan.code] = orjson.dumps(
                {"object": "list", "data": [model_object(model) for model in visible]}
            )
            for model in visible:
                self._one[(plan.code, model.id)] = orjson.dumps(model_object(model))

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
