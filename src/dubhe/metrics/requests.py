"""What each ``/v1`` request leaves behind once its answer is sent: latency, tokens and cost in
the metrics, and (when ``DUBHE_ACCESS_LOG`` is on) one JSON log line.

The line holds the request id, user id, key id and prefix, model, upstream, status, tokens, cost
and latency; never a key, never a prompt or an answer.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter, Histogram

from dubhe.metrics import add, observe_seconds, path_label

if TYPE_CHECKING:
    from dubhe.gateway.asgi import Scope

# Set by chat.py: (KeyIdentity, ChatCompletion, Settled | None).
FACTS_SCOPE_KEY = "dubhe.facts"

access_log = logging.getLogger("dubhe.access")

_LATENCY_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
LATENCY = Histogram("dubhe_http_request_seconds", "Time to the end of the answer, by path.",
                    ["path"], buckets=_LATENCY_BOUNDS)
TOKENS = Counter("dubhe_tokens", "Tokens charged, by model and kind (prompt, completion).",
                 ["model", "kind"])
COST = Counter("dubhe_cost_uusd", "Micro-dollars charged, by model.", ["model"])


def observe(scope: Scope, status: int, request_id: str, started: float, *,
            log_line: bool) -> None:
    seconds = time.perf_counter() - started
    path = path_label(scope["path"])
    observe_seconds(LATENCY, _LATENCY_BOUNDS, path, seconds)
    facts = scope.get(FACTS_SCOPE_KEY)
    identity = completion = settled = None
    model = None
    if facts is not None:
        identity, completion, settled = facts
        spec = getattr(completion, "model", None)
        model = spec.id if spec is not None else None
    if settled is not None and model is not None:
        add(TOKENS, model, "prompt", amount=settled.prompt_tokens)
        add(TOKENS, model, "completion", amount=settled.completion_tokens)
        if settled.cost_uusd:
            add(COST, model, amount=settled.cost_uusd)
    if not log_line or not access_log.isEnabledFor(logging.INFO):
        return
    line: dict[str, Any] = {
        "event": "request",
        "request_id": request_id,
        "method": scope["method"],
        "path": path,
        "status": status,
        "latency_ms": round(seconds * 1000, 1),
    }
    if identity is not None:
        line["user_id"] = identity.user_id
        line["key_id"] = identity.key_id
        line["key_prefix"] = identity.key_prefix
    if model is not None:
        line["model"] = model
        upstream = getattr(completion, "upstream", None)
        if upstream is not None:
            line["upstream"] = upstream.spec.name
    if settled is not None:
        line["prompt_tokens"] = settled.prompt_tokens
        line["completion_tokens"] = settled.completion_tokens
        line["cost_uusd"] = settled.cost_uusd
    access_log.info(orjson.dumps(line).decode())
