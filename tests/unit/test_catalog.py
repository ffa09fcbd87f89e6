from __future__ import annotations

from pathlib import Path

import pytest

from dubhe.catalog import CatalogError, load_catalog


def test_defaults_are_the_product_decisions() -> None:
    catalog = load_catalog(None)
    assert set(catalog.models) == {
        "dubhe-fast", "dubhe-vision", "dubhe-reasoning", "dubhe-code", "dubhe-agent", "dubhe-qwen"
    }
    fast = catalog.models["dubhe-fast"]
    assert (fast.context_window, fast.function_calling, fast.vision) == (131072, True, False)
    assert catalog.models["dubhe-vision"].context_window == 1048576
    assert not catalog.models["dubhe-vision"].function_calling
    assert catalog.models["dubhe-agent"].vision and catalog.models["dubhe-agent"].function_calling
    # $0.20 / $0.60 per million tokens, as integer micro-dollars.
    assert (fast.input_price_uusd_per_mtok, fast.output_price_uusd_per_mtok) == (200_000, 600_000)
    assert catalog.models["dubhe-reasoning"].output_price_uusd_per_mtok == 6_000_000
    plans = catalog.plans
    assert plans["free"].models == {"dubhe-fast"}
    assert plans["free"].included_tokens == 100_000
    assert (plans["pro"].price_cents, plans["pro"].requests_per_minute) == (2900, 300)
    assert len(plans["ultimate"].models) == 6
    assert plans["ultimate"].concurrent_requests == 50
    assert [p.code for p in catalog.plans_including("dubhe-code")] == ["pro", "ultimate"]


def test_operator_file_overrides_named_fields(tmp_path: Path) -> None:
    config = tmp_path / "dubhe.toml"
    config.write_text(
        """
[models.dubhe-fast]
output_price_usd_per_mtok = "0.75"
[models.dubhe-qwen]
enabled = false
[plans.free]
models = ["dubhe-fast"]
included_tokens = 5
[[upstreams]]
name = "vllm"
base_url = "http://10.0.0.1:8000/v1/"
models = ["dubhe-fast"]
model_map = { "dubhe-fast" = "meta-llama/Llama-3.1-8B" }
"""
    )
    catalog = load_catalog(config)
    assert catalog.models["dubhe-fast"].output_price_uusd_per_mtok == 750_000
    assert catalog.models["dubhe-fast"].input_price_uusd_per_mtok == 200_000  # untouched
    assert "dubhe-qwen" not in catalog.models
    assert "dubhe-qwen" not in catalog.plans["ultimate"].models
    assert catalog.plans["free"].included_tokens == 5
    [upstream] = catalog.upstreams
    assert upstream.kind == "openai" and upstream.base_url == "http://10.0.0.1:8000/v1"
    assert upstream.model_map == {"dubhe-fast": "meta-llama/Llama-3.1-8B"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.dubhe-fast]\ninput_price_usd_per_mtok = 0.2\n', "not a float"),
        ('[models.dubhe-fast]\ncontext_window = 0\n', "positive integer"),
        ('[plans.free]\nmodels = ["gpt-4"]\n', "unknown models"),
        ('[[upstreams]]\nname = "x"\nkind = "grpc"\nbase_url = "http://a/v1"\n', "kind"),
        ('[[upstreams]]\nname = "x"\nbase_url = "ftp://a"\n', "base_url"),
        ('[[upstreams]]\nname = "x"\nbase_url = "http:///v1"\n', "base_url .* with a host"),
        ('[[upstreams]]\nname = "x"\nbase_url = "http://a:99999/v1"\n', "base_url"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_configuration_is_refused_with_the_entry_named(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "dubhe.toml"
    config.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_catalog(config)


def test_input_kinds_and_prompt_bound_fields_default_and_override(tmp_path: Path) -> None:
    shipped = load_catalog(None)
    for model in shipped.models.values():
        assert not model.audio_input and not model.file_input
        assert model.max_image_tokens == 2048
        assert (model.message_overhead_tokens, model.request_overhead_tokens) == (8, 128)
    [builtin] = shipped.upstreams
    assert builtin.output_limit_fields == ("max_tokens", "max_completion_tokens")

    config = tmp_path / "dubhe.toml"
    config.write_text(
        """
[defaults]
max_image_tokens = 1500
[models.dubhe-agent]
audio_input = true
max_image_tokens = 16384
[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1"
models = ["dubhe-reasoning"]
output_limit_fields = ["max_completion_tokens"]
"""
    )
    catalog = load_catalog(config)
    agent = catalog.models["dubhe-agent"]
    assert agent.audio_input and not agent.file_input
    assert agent.max_image_tokens == 16384
    assert catalog.models["dubhe-vision"].max_image_tokens == 1500
    [openai] = catalog.upstreams
    assert openai.output_limit_fields == ("max_completion_tokens",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.dubhe-fast]\nmax_image_tokens = 0\n", r"models\.dubhe-fast\.max_image_tokens"),
        ("[defaults]\nmax_image_tokens = -1\n", r"defaults\.max_image_tokens must be a positive"),
        ("[models.dubhe-fast]\naudio_input = 1\n", r"models\.dubhe-fast\.audio_input"),
        ("[models.dubhe-fast]\nrequest_overhead_tokens = -1\n", r"request_overhead_tokens"),
        ("[models.dubhe-fast]\ndefault_max_tokens = 0\n", r"models\.dubhe-fast\.default_max"),
        (
            '[[upstreams]]\nname = "x"\nbase_url = "http://a/v1"\noutput_limit_fields = ["max"]\n',
            r"upstreams\.x\.output_limit_fields",
        ),
        (
            '[[upstreams]]\nname = "x"\nbase_url = "http://a/v1"\noutput_limit_fields = []\n',
            r"upstreams\.x\.output_limit_fields",
        ),
    ],
)
def test_bad_bound_fields_are_refused_with_the_field_named(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "dubhe.toml"
    config.write_text(text)
    with pytest.raises(CatalogError, match=message):
        load_catalog(config)
