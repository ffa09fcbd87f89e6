from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    name: str
    context_window: int
    streaming: bool
    function_calling: bool
    vision: bool
    # Integer micro-dollars per million tokens: money never touches a float.
    input_price_uusd_per_mtok: int
    output_price_uusd_per_mtok: int
    default_max_tokens: int
    created: int
    status: str = "available"  # available | maintenance
    # Input kinds beyond text and images (images are ``vision``): ``input_audio`` and ``file``
    # content parts are refused with 422 unless the model takes them.
    audio_input: bool = False
    file_input: bool = False
    # The most tokens any one image can cost on this model's upstreams: the prompt bound holds
    # this per image instead of the bytes of its URL (see ``gateway/admission.py``).
    max_image_tokens: int = 2048
    # Tokens a chat template may add around each message (role markers, separators) and once
    # per request (a default system text, tool-use instructions), beyond the request's own bytes.
    message_overhead_tokens: int = 8
    request_overhead_tokens: int = 128
    # What the homepage says about the model: a sentence, and what it is best for.
    description: str = ""
    best_for: str = ""


@dataclass(frozen=True, slots=True)
class PlanSpec:
    code: str
    name: str
    price_cents: int
    models: frozenset[str]
    included_tokens: int
    requests_per_minute: int
    tokens_per_minute: int
    concurrent_requests: int


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One ``[[upstreams]]`` entry: a deployment of each public model it lists."""

    name: str
    # "openai" (any OpenAI-compatible server), "sim" (the built-in simulator), "anthropic"
    # (Anthropic's Messages API, translated both ways by ``providers/anthropic.py``) or "local"
    # (a GGUF model in a process of Dubhe's own, ``providers/local_model.py``).
    kind: str
    base_url: str
    models: tuple[str, ...]
    model_map: dict[str, str] = field(default_factory=dict)
    api_key_env: str | None = None
    # The request fields that carry the output limit upstream, each set to the limit Dubhe held.
    # Both by default (vLLM, llama.cpp, Ollama read either); one where the upstream refuses the
    # other (OpenAI's reasoning models refuse max_tokens). An Anthropic deployment always sends
    # its own ``max_tokens``.
    output_limit_fields: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
    # Routing: a weighted choice within the best (lowest) priority tier that has a healthy
    # deployment; the next tier only when every deployment of the better one is down.
    weight: int = 1
    priority: int = 0
    # Timeouts in seconds; None takes the catalog's [defaults]. ``first_byte`` bounds the wait for
    # the answer's status and first event, ``idle`` the silence between two reads after that,
    # ``total`` the whole exchange.
    connect_timeout_seconds: float | None = None
    first_byte_timeout_seconds: float | None = None
    idle_timeout_seconds: float | None = None
    total_timeout_seconds: float | None = None
    # This deployment's own limits, narrower than the public model's where its server is: None
    # means "as the public model".
    context_window: int | None = None
    vision: bool | None = None
    function_calling: bool | None = None
    # Takes ``n`` > 1 (Anthropic's API has no ``n``).
    multiple_choices: bool = True
    # kind = "local" (``dubhe local-model``, started and supervised by ``dubhe serve``): the GGUF
    # file (None: the bundled Gemma 3 270M), how many requests may wait for the model, and the
    # CPU threads it uses (None: llama.cpp's choice).
    model_file: str | None = None
    queue: int = 8
    threads: int | None = None


@dataclass(frozen=True, slots=True)
class Catalog:
    models: dict[str, ModelSpec]
    plans: dict[str, PlanSpec]
    upstreams: tuple[UpstreamSpec, ...]
    upstream_timeout_seconds: float
    upstream_connect_timeout_seconds: float
    max_request_bytes: int
    # A stream whose upstream is silent this long gets a ": ping" comment, so proxies keep it.
    stream_keepalive_seconds: float
    # The plan of new accounts, and of paid plans whose renewal the balance cannot cover.
    default_plan: str
    # A worker's credit lease not renewed for this long belongs to a dead worker and is returned.
    reservation_ttl_seconds: float
    # A lease unused for this long returns its credit to the account.
    lease_idle_seconds: float
    # One upstream stream event may be at most this large (an event that never ends is cut).
    max_upstream_event_bytes: int = 8 * 1024 * 1024
    # Of an upstream's error answer, at most this much is read (for its message and the log).
    max_upstream_error_bytes: int = 64 * 1024
    # A non-streaming answer larger than this is a 502 (it is held whole, parsed and re-encoded).
    max_upstream_answer_bytes: int = 64 * 1024 * 1024
    # Failover: how many deployments one request may try before anything reached the client,
    # and the circuit breaker each deployment has (see ``dubhe.routing``).
    upstream_max_attempts: int = 3
    upstream_first_byte_timeout_seconds: float = 60
    breaker_failures: int = 3
    breaker_cooldown_seconds: float = 30

    def plans_including(self, model_id: str) -> list[PlanSpec]:
        return [plan for plan in self.plans.values() if model_id in plan.models]

    def upstreams_for(self, model_id: str) -> list[UpstreamSpec]:
        return [upstream for upstream in self.upstreams if model_id in upstream.models]
