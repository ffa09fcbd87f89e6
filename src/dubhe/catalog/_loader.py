from __future__ import annotations

import tomllib
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dubhe.catalog._types import Catalog, ModelSpec, PlanSpec, UpstreamSpec

UPSTREAM_KINDS = frozenset({"openai", "sim", "anthropic", "local"})
# A local model's own window when its entry gives none (Gemma 3 270M takes 32K; less memory).
LOCAL_CONTEXT_WINDOW = 8192
OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


class CatalogError(Exception):
    """The catalog configuration is invalid; the message names the offending entry."""


def load_catalog(path: Path | None = None, *, builtin_upstream: str = "sim") -> Catalog:
    """The shipped defaults with the operator's file at ``path`` laid over them.

    Where the operator configures no ``[[upstreams]]``, the shipped one serves every model:
    the simulator, or with ``builtin_upstream = "local"`` the bundled local model (then every
    model says what that deployment takes: its context window, no images, no tools)."""
    raw = tomllib.loads(resources.files("dubhe.catalog").joinpath("defaults.toml").read_text())
    operator_upstreams = False
    if path is not None and path.exists():
        try:
            operator = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{path}: not valid TOML: {exc}") from exc
        for table in ("models", "plans"):
            raw[table] = _merge_entries(raw.get(table, {}), operator.get(table, {}))
        # A disabled model leaves the plans that listed it.
        disabled = {key for key, entry in operator.get("models", {}).items() if entry.get("enabled") is False}
        for plan in raw["plans"].values():
            plan["models"] = [model for model in plan.get("models", []) if model not in disabled]
        if "upstreams" in operator:
            raw["upstreams"] = operator["upstreams"]
            operator_upstreams = True
        raw["defaults"] = {**raw.get("defaults", {}), **operator.get("defaults", {})}
        if builtin_upstream == "local" and not operator_upstreams:
            _serve_from_the_bundled_model(raw)
        try:
            return _build(raw)
        except CatalogError as exc:
            # The shipped defaults are valid: whatever is wrong came from the operator's file.
            raise CatalogError(f"{path}: {exc}") from None
    if builtin_upstream == "local" and not operator_upstreams:
        _serve_from_the_bundled_model(raw)
    return _build(raw)


BUNDLED_MODEL_URL = "http://127.0.0.1:9200/v1"


def _serve_from_the_bundled_model(raw: dict[str, Any]) -> None:
    models = raw.get("models", {})
    for entry in models.values():
        entry["context_window"] = min(int(entry.get("context_window", 0)), LOCAL_CONTEXT_WINDOW)
        entry["vision"] = False
        entry["function_calling"] = False
    raw["upstreams"] = [
        {"name": "bundled", "kind": "local", "base_url": BUNDLED_MODEL_URL, "models": list(models)}
    ]


def _merge_entries(shipped: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """An operator's entry overrides the fields it names; ``enabled = false`` removes it."""
    merged = {key: dict(value) for key, value in shipped.items()}
    for key, fields in given.items():
        merged[key] = {**merged.get(key, {}), **fields}
    return {key: value for key, value in merged.items() if value.pop("enabled", True)}


def _build(raw: dict[str, Any]) -> Catalog:
    defaults = raw.get("defaults", {})
    default_max_tokens = _positive_int(defaults, "default_max_tokens", "defaults", 4096)
    # Model fields whose shipped value lives in [defaults], so one line changes every model.
    inherited = {
        key: defaults[key]
        for key in (
            "max_image_tokens",
            "message_overhead_tokens",
            "request_overhead_tokens",
        )
        if key in defaults
    }
    if "max_image_tokens" in inherited:
        _positive_int(defaults, "max_image_tokens", "defaults")
    for key in ("message_overhead_tokens", "request_overhead_tokens"):
        if key in inherited:
            _count(defaults, key, "defaults", 0)
    created = int(defaults.get("model_created", 1735689600))
    models: dict[str, ModelSpec] = {}
    for model_id, given in raw.get("models", {}).items():
        where = f"models.{model_id}"
        entry = {**inherited, **given}
        status = entry.get("status", "available")
        if status not in ("available", "maintenance"):
            raise CatalogError(f"{where}.status must be 'available' or 'maintenance'")
        models[model_id] = ModelSpec(
            id=model_id,
            name=str(entry.get("name", model_id)),
            context_window=_positive_int(entry, "context_window", where),
            streaming=bool(entry.get("streaming", True)),
            function_calling=bool(entry.get("function_calling", False)),
            vision=bool(entry.get("vision", False)),
            input_price_uusd_per_mtok=_usd_to_micro(entry, "input_price_usd_per_mtok", where),
            output_price_uusd_per_mtok=_usd_to_micro(entry, "output_price_usd_per_mtok", where),
            default_max_tokens=_positive_int(entry, "default_max_tokens", where, default_max_tokens),
            created=int(entry.get("created", created)),
            status=status,
            audio_input=_bool(entry, "audio_input", where),
            file_input=_bool(entry, "file_input", where),
            max_image_tokens=_positive_int(entry, "max_image_tokens", where, 2048),
            message_overhead_tokens=_count(entry, "message_overhead_tokens", where, 8),
            request_overhead_tokens=_count(entry, "request_overhead_tokens", where, 128),
            description=_text(entry, "description", where),
            best_for=_text(entry, "best_for", where),
        )
    plans: dict[str, PlanSpec] = {}
    for code, entry in raw.get("plans", {}).items():
        where = f"plans.{code}"
        listed = frozenset(entry.get("models", []))
        unknown = listed - models.keys()
        if unknown:
            raise CatalogError(f"{where}.models names unknown models: {sorted(unknown)}")
        plans[code] = PlanSpec(
            code=code,
            name=str(entry.get("name", code)),
            price_cents=_usd_to_micro(entry, "price_usd", where) // 10_000,
            models=listed,
            included_tokens=int(entry.get("included_tokens", 0)),
            requests_per_minute=_positive_int(entry, "requests_per_minute", where),
            tokens_per_minute=_positive_int(entry, "tokens_per_minute", where),
            concurrent_requests=_positive_int(entry, "concurrent_requests", where),
        )
    if not plans:
        raise CatalogError("the catalog defines no plans")
    upstreams = tuple(
        _upstream(entry, index, models) for index, entry in enumerate(raw.get("upstreams", []))
    )
    names = [upstream.name for upstream in upstreams]
    if len(set(names)) != len(names):
        raise CatalogError(f"two [[upstreams]] entries share a name: {sorted(names)}")
    default_plan = str(defaults.get("default_plan", "free"))
    if default_plan not in plans:
        raise CatalogError(f"defaults.default_plan {default_plan!r} is not a plan")
    return Catalog(
        models=models,
        plans=plans,
        upstreams=upstreams,
        upstream_timeout_seconds=float(defaults.get("upstream_timeout_seconds", 600)),
        upstream_connect_timeout_seconds=float(
            defaults.get("upstream_connect_timeout_seconds", 10)
        ),
        max_request_bytes=int(defaults.get("max_request_bytes", 16 * 1024 * 1024)),
        stream_keepalive_seconds=float(defaults.get("stream_keepalive_seconds", 15)),
        default_plan=default_plan,
        reservation_ttl_seconds=float(defaults.get("reservation_ttl_seconds", 120)),
        lease_idle_seconds=float(defaults.get("lease_idle_seconds", 10)),
        max_upstream_event_bytes=_positive_int(
            {"max_upstream_event_bytes": 8 * 1024 * 1024, **defaults},
            "max_upstream_event_bytes",
            "defaults",
        ),
        max_upstream_error_bytes=_positive_int(
            {"max_upstream_error_bytes": 64 * 1024, **defaults},
            "max_upstream_error_bytes",
            "defaults",
        ),
        max_upstream_answer_bytes=_positive_int(
            {"max_upstream_answer_bytes": 64 * 1024 * 1024, **defaults},
            "max_upstream_answer_bytes",
            "defaults",
        ),
        upstream_max_attempts=_positive_int(
            {"upstream_max_attempts": 3, **defaults}, "upstream_max_attempts", "defaults"
        ),
        upstream_first_byte_timeout_seconds=_seconds(
            defaults, "upstream_first_byte_timeout_seconds", "defaults", 60
        ),
        breaker_failures=_positive_int(
            {"breaker_failures": 3, **defaults}, "breaker_failures", "defaults"
        ),
        breaker_cooldown_seconds=_seconds(defaults, "breaker_cooldown_seconds", "defaults", 30),
    )


_UPSTREAM_FIELDS = frozenset(
    {
        "name", "kind", "base_url", "models", "model_map", "api_key_env", "output_limit_fields",
        "weight", "priority", "connect_timeout_seconds", "first_byte_timeout_seconds",
        "idle_timeout_seconds", "total_timeout_seconds", "context_window", "vision",
        "function_calling", "multiple_choices", "model_file", "queue", "threads",
    }
)  # fmt: skip


def _upstream(entry: dict[str, Any], index: int, models: dict[str, ModelSpec]) -> UpstreamSpec:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise CatalogError(f"upstreams[{index}] (the entry number {index + 1}) needs a name")
    where = f"upstreams.{name}"
    unknown_fields = set(entry) - _UPSTREAM_FIELDS
    if unknown_fields:
        # A misspelt field (``wieght``) would otherwise be ignored in silence.
        raise CatalogError(f"{where} has unknown fields: {sorted(unknown_fields)}")
    kind = entry.get("kind", "openai")
    if kind not in UPSTREAM_KINDS:
        raise CatalogError(f"{where}.kind must be one of {sorted(UPSTREAM_KINDS)}, not {kind!r}")
    base_url = entry.get("base_url")
    if (not isinstance(base_url, str) or not base_url.startswith(("http://", "https://"))
            or not _has_host(base_url)):
        raise CatalogError(f"{where}.base_url must be an http(s) URL with a host")
    served = tuple(entry.get("models", []))
    unknown = set(served) - models.keys()
    if unknown:
        raise CatalogError(f"{where}.models names unknown models: {sorted(unknown)}")
    model_map = dict(entry.get("model_map", {}))
    if set(model_map) - set(served):
        raise CatalogError(f"{where}.model_map renames models it does not serve")
    limit_fields = entry.get("output_limit_fields", list(OUTPUT_LIMIT_FIELDS))
    if (
        not isinstance(limit_fields, list)
        or not limit_fields
        or any(field not in OUTPUT_LIMIT_FIELDS for field in limit_fields)
    ):
        raise CatalogError(
            f"{where}.output_limit_fields must be a non-empty list of {list(OUTPUT_LIMIT_FIELDS)}"
        )
    api_key_env = entry.get("api_key_env")
    if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
        raise CatalogError(f"{where}.api_key_env must name an environment variable")
    priority = entry.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise CatalogError(f"{where}.priority must be an integer >= 0 (0 is tried first)")
    local = kind == "local"
    model_file = entry.get("model_file")
    if model_file is not None and (not local or not isinstance(model_file, str)):
        raise CatalogError(f"{where}.model_file is a GGUF file's path, for kind = \"local\" only")
    context_window = (
        _positive_int(entry, "context_window", where) if "context_window" in entry else None
    )
    return UpstreamSpec(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        models=served,
        model_map=model_map,
        api_key_env=api_key_env,
        output_limit_fields=tuple(dict.fromkeys(limit_fields)),
        weight=_positive_int(entry, "weight", where, 1),
        priority=priority,
        connect_timeout_seconds=_optional_seconds(entry, "connect_timeout_seconds", where),
        first_byte_timeout_seconds=_optional_seconds(entry, "first_byte_timeout_seconds", where),
        idle_timeout_seconds=_optional_seconds(entry, "idle_timeout_seconds", where),
        total_timeout_seconds=_optional_seconds(entry, "total_timeout_seconds", where),
        # A local model is what it is: its own window, text only, no tools, one choice.
        context_window=context_window or (LOCAL_CONTEXT_WINDOW if local else None),
        vision=_bool(entry, "vision", where) if "vision" in entry else (False if local else None),
        function_calling=(
            _bool(entry, "function_calling", where)
            if "function_calling" in entry
            else (False if local else None)
        ),
        multiple_choices=(
            _bool(entry, "multiple_choices", where)
            if "multiple_choices" in entry
            else kind not in ("anthropic", "local")
        ),
        model_file=model_file,
        queue=_positive_int(entry, "queue", where, 8),
        threads=_positive_int(entry, "threads", where) if "threads" in entry else None,
    )


def _seconds(entry: dict[str, Any], key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise CatalogError(f"{where}.{key} must be a number of seconds > 0")
    return float(value)


def _optional_seconds(entry: dict[str, Any], key: str, where: str) -> float | None:
    return _seconds(entry, key, where, 0) if key in entry else None


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise CatalogError(f"{where}.{key} must be a string")
    return value.strip()


def _positive_int(entry: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CatalogError(f"{where}.{key} must be a positive integer")
    return value


def _count(entry: dict[str, Any], key: str, where: str, default: int) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CatalogError(f"{where}.{key} must be an integer >= 0")
    return value


def _bool(entry: dict[str, Any], key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise CatalogError(f"{where}.{key} must be true or false")
    return value


def _usd_to_micro(entry: dict[str, Any], key: str, where: str) -> int:
    """Parse a USD amount given as a string (or int) into integer micro-dollars, exactly."""
    value = entry.get(key, "0")
    if isinstance(value, float):
        raise CatalogError(f'{where}.{key}: write money as a string ("0.20"), not a float')
    try:
        micro = Decimal(str(value)) * 1_000_000
    except InvalidOperation as exc:
        raise CatalogError(f"{where}.{key}: {value!r} is not an amount") from exc
    if micro < 0 or micro != micro.to_integral_value():
        raise CatalogError(f"{where}.{key}: {value!r} must be >= 0 with at most 6 decimals")
    return int(micro)


def _has_host(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError:
        return False
    return bool(parts.hostname)
