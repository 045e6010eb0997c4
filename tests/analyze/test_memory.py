import math

import pytest
import torch

from effllm.analyze.memory import (
    inference_memory,
    kv_cache_bytes,
    optimizer_state_bytes,
    parameter_shapes,
    training_memory,
    weight_bytes,
)
from effllm.analyze.shapes import load_model_config
from effllm.core.errors import ConfigError
from effllm.models import CausalLM
from effllm.models.config import ModelConfig
from effllm.optim import build_optimizer, list_optimizers, optimizer_options

LLAMA = dict(
    model_type="llama",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
QWEN_TIED = dict(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)


def _effllm_model(raw: dict) -> torch.nn.Module:
    return CausalLM(ModelConfig.from_hf_dict(raw))


def _transformers_model(raw: dict) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in cls[raw["model_type"]])
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    return model_cls(config_cls(**fields))


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 96, (2, 5))
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().square().mean().backward()
    optimizer.step()


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


BUILDERS = [pytest.param(_effllm_model, id="effllm"), pytest.param(_transformers_model, id="transformers")]
CONFIGS = [pytest.param(LLAMA, id="llama"), pytest.param(QWEN_TIED, id="qwen2-tied-bias")]


@pytest.mark.parametrize("raw", CONFIGS)
@pytest.mark.parametrize("build", BUILDERS)
def test_parameter_shapes_are_the_real_models_named_parameters(build, raw):
    model = build(raw)
    config = ModelConfig.from_hf_dict(raw)
    assert parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert sum(math.prod(s) for s in parameter_shapes(config).values()) == config.num_parameters()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("raw", CONFIGS)
@pytest.mark.parametrize("build", BUILDERS)
def test_memory_estimator_matches_parameter_and_adamw_state_bytes_of_a_real_model_exactly(build, raw, dtype):
    torch.manual_seed(0)
    model = build(raw).to(dtype)
    config = ModelConfig.from_hf_dict(raw)
    bits = torch.finfo(dtype).bits
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, optimizer)
    params = list(model.parameters())
    estimate = training_memory(config, batch=2, seq_len=5, optimizer="adamw", param_bits=bits)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in params)
    assert estimate.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert estimate.optimizer_state == _state_bytes(optimizer)
    assert weight_bytes(config, bits) == estimate.weights


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {}])
def test_memory_estimator_matches_sgd_state_bytes_exactly(kwargs):
    model = _effllm_model(LLAMA)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, **kwargs)
    _train_step(model, sgd)
    assert optimizer_state_bytes(ModelConfig.from_hf_dict(LLAMA), "sgd", options=kwargs) == _state_bytes(sgd)


BACKWARD_FREE = {
    "zo_sgd",
    "zo_sgd_sign",
    "zo_sgd_momentum",
    "zo_sgd_conservative",
    "zo_adam",
    "forward_grad_sgd",
}


def _step_any(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 96, (2, 5))

    def loss(*_):
        return model(ids).float().square().mean()

    if name in BACKWARD_FREE:
        optimizer.step(loss)
    else:
        loss().backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(list_optimizers()))
def test_every_registered_optimizer_has_an_exact_state_estimate(name):
    """The names `effllm train --optimizer` takes are the names the estimator takes, and it counts exactly
    the bytes each one holds after its first step."""
    torch.manual_seed(0)
    model = _effllm_model(LLAMA)
    options = {"rank": 4} if "rank" in optimizer_options(name) else {}
    optimizer = build_optimizer(name, model, lr=1e-3, **options)
    _step_any(name, model, optimizer)
    config = ModelConfig.from_hf_dict(LLAMA)
    assert optimizer_state_bytes(config, name, rank=4) == _state_bytes(optimizer)
    assert (training_memory(config, optimizer=name).gradients == 0) == (name in BACKWARD_FREE)


def test_galore_state_is_a_projector_and_adam_moments_of_the_projected_gradient():
    config = ModelConfig.from_hf_dict(LLAMA)
    full = optimizer_state_bytes(config, "adamw", param_bits=32)
    galore = optimizer_state_bytes(config, "galore_adamw", param_bits=32, rank=4)
    # per projection weight (m x n): projector 4 x min(m, n) and moments 2 x 4 x max(m, n), fp32;
    # everything else keeps full moments; galore-torch's step is a Python int (no tensor)
    expected = 0
    for name, shape in parameter_shapes(config).items():
        if name.endswith("_proj.weight"):
            expected += 4 * (4 * min(shape) + 2 * 4 * max(shape))
        else:
            expected += 4 * 2 * math.prod(shape)
    assert galore == expected < full
    # a rank above the matrix's smaller side is capped by the SVD
    assert optimizer_state_bytes(config, "galore_adamw", rank=10_000) == optimizer_state_bytes(
        config, "galore_adamw", rank=32
    )


def test_8bit_states_follow_bitsandbytes_blockwise_layout():
    config = load_model_config("galore-60m")
    state = optimizer_state_bytes(config, "adamw", state_bits=8)
    expected = 0
    for shape in parameter_shapes(config).values():
        n = math.prod(shape)
        # uint8 + one fp32 absmax per 256 elements, per moment; tensors under 4096 elements stay fp32
        expected += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * 4 * n
    assert state == expected
    assert state < optimizer_state_bytes(config, "adamw") / 3.5


def test_zeroth_order_keeps_no_gradients_or_optimizer_state():
    config = load_model_config("galore-350m")
    zo = training_memory(config, batch=4, seq_len=256, optimizer="zo_sgd")
    adam = training_memory(config, batch=4, seq_len=256, optimizer="adamw")
    assert zo.gradients == zo.optimizer_state == 0
    assert zo.weights == adam.weights
    assert zo.activations < adam.activations


def test_checkpointing_and_layerwise_updates_cut_training_memory():
    config = load_model_config("galore-350m")
    plain = training_memory(config, batch=8, seq_len=1024)
    ckpt = training_memory(config, batch=8, seq_len=1024, checkpointing=True)
    layerwise = training_memory(config, batch=8, seq_len=1024, layerwise_update=True)
    assert ckpt.activations < plain.activations / 3
    assert layerwise.gradients == max(math.prod(s) for s in parameter_shapes(config).values()) * 4


def test_kv_cache_bytes_per_token_and_batch():
    config = load_model_config("llama-7b")
    per_token = 2 * 32 * 4096 * 2  # K and V, 32 layers, 4096 wide, 16 bits: 0.5 MiB
    assert kv_cache_bytes(config, batch=1, context=1) == per_token
    assert kv_cache_bytes(config, batch=4, context=1000, kv_bits=8) == 4 * 1000 * per_token / 2
    memory = inference_memory(config, batch=4, context=1000)
    assert memory.kv_cache_per_token == per_token
    assert memory.weights == config.num_parameters() * 2
    assert memory.total == memory.weights + memory.kv_cache + memory.activations
    mistral = load_model_config("mistral-7b")  # sliding window 4096 on every layer
    assert kv_cache_bytes(mistral, 1, 10_000) == kv_cache_bytes(mistral, 1, 4096)


def test_bad_memory_arguments_raise_config_errors():
    config = load_model_config("galore-60m")
    with pytest.raises(ConfigError):
        training_memory(config, optimizer="lion")
    with pytest.raises(ConfigError):
        optimizer_state_bytes(config, state_bits=4)
    with pytest.raises(ConfigError):
        inference_memory(config, batch=0)
