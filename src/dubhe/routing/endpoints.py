"""``GET /admin/api/upstreams``: each deployment and its circuit breaker, for admins.

The state is this worker's (breakers live in each worker's memory); ``worker_pid`` says which.
Nothing secret is shown: not the credential, nor the environment variable's value.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter

from dubhe.accounts.sessions import SessionUserDep
from dubhe.errors import Forbidden
from dubhe.web.dependencies import StateDep

router = APIRouter()


@router.get("/admin/api/upstreams")
async def upstream_health(state: StateDep, user: SessionUserDep) -> dict[str, Any]:
    if not user.is_admin:
        raise Forbidden("Only an admin can see the upstreams.", code="admin_required")
    now = time.monotonic()
    deployments = state.upstreams.all if state.upstreams is not None else ()
    return {
        "worker_pid": os.getpid(),
        "data": [
            {
                "name": deployment.spec.name,
                "kind": deployment.spec.kind,
                "models": list(deployment.spec.models),
                "priority": deployment.spec.priority,
                "weight": deployment.spec.weight,
                "breaker": deployment.breaker.snapshot(now),
            }
            for deployment in deployments
        ],
    }
