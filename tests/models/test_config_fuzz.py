"""A corrupt or hostile config.json loads or fails with an EffLLMError at once, before allocating the model."""

import json
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effllm.core.errors import ConfigError, EffLLMError
from effllm.models import CausalLM, ModelConfig, load_model, save_model

KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
    "eos_token_id",
    "bos_token_id",
    "initializer_range",
    "partial_rotary_factor",
    "hidden_act",
    "attention_bias",
    "effllm",
    "model_type",
]
BAD_VALUES = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            -(2**40),
            2**31,
            10_000_000,
            2**63,
            1e308,
            float("nan"),
            float("inf"),
            -float("inf"),
            0.5,
            1e-300,
            True,
            False,
            None,
            "",
            "12",
            "abc",
            [],
            [1, 2],
            {},
            {"rope_type": "yarn"},
            {"rope_type": "linear", "factor": "x"},
            {"rope_type": "llama3"},
        ]
    ),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    save_model(CausalLM(config), folder)
    load_model(folder, device="cpu")(
        torch.tensor([[1]])
    )  # warm-up: the first load and forward pay for imports
    return folder


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.dictionaries(st.sampled_from(KEYS), BAD_VALUES, min_size=1, max_size=3))
def test_mutated_config_loads_or_fails_cleanly_and_at_once(checkpoint, mutations):
    path = checkpoint / "config.json"
    original = path.read_text()
    raw = json.loads(original)
    raw.update(mutations)
    try:
        path.write_text(json.dumps(raw))
        start = time.perf_counter()
        try:
            model = load_model(checkpoint, device="cpu")
        except EffLLMError:
            model = None
        # Not a speed assertion: a config that would build forever (10M layers took minutes and GBs before)
        # must fail at once. Building 60 meta layers of a loaded 2-core machine can take over a second.
        assert time.perf_counter() - start < 10.0
        if model is not None:  # a mutation the model tolerates: it must still compute finite logits
            with torch.no_grad():
                assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    finally:
        path.write_text(original)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_hidden_layers", 10_000_000),
        ("rms_norm_eps", math.nan),
        ("rope_theta", math.inf),
        ("hidden_size", 0),
        ("vocab_size", "32000"),
        ("num_attention_heads", 2.5),
        ("num_key_value_heads", 3),
    ],
)
def test_named_bad_values_are_refused_naming_the_field(checkpoint, key, value):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw[key] = value
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf_dict(raw)


def test_a_model_larger_than_free_memory_is_refused_before_allocation(tmp_path, monkeypatch):
    config = ModelConfig(
        vocab_size=256_000,
        hidden_size=16_384,
        intermediate_size=53_248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
    )
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"needs \d+\.\d+ GiB but cpu has"):
        load_model(folder, dtype="bfloat16", device="cpu")
