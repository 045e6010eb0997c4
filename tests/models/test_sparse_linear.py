"""SparseLinear equals the dense product over the same zeros; the engine runs a pruned model through it."""

import pytest
import torch
from torch import nn

from effllm.bench.sparse_matmul import pruned_weight
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig
from effllm.models.sparse_linear import SparseLinear, sparsify_linears_
from effllm.models.transformer import CausalLM


def test_sparse_linear_equals_the_dense_product_with_bias_and_batch_dims():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(24, 10)
    with torch.no_grad():
        linear.weight.copy_(pruned_weight(24, 10, "0.7", gen))
    sparse = SparseLinear.from_linear(linear)
    assert sparse.sparsity == pytest.approx(float((linear.weight == 0).float().mean()))
    x = torch.randn(2, 3, 24, generator=gen)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="float32"):
        SparseLinear(linear.weight.bfloat16())


def test_pruned_weight_patterns_have_exact_zero_counts():
    gen = torch.Generator().manual_seed(1)
    w = pruned_weight(16, 8, "2:4", gen)
    assert ((w.reshape(8, 4, 4) == 0).sum(-1) == 2).all()
    assert 0.85 < float((pruned_weight(64, 64, "0.9", gen) == 0).float().mean()) < 0.95


def test_sparsify_converts_only_linears_sparse_enough_and_keeps_the_logits():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = CausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.copy_(pruned_weight(w.shape[1], w.shape[0], "0.9", torch.Generator().manual_seed(2)))
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids)
        assert sparsify_linears_(model, 0.8) == 2
        assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        sparsify_linears_(model, 1.5)


def test_engine_generates_the_same_tokens_with_sparse_linears(tmp_path):
    from effllm.compress.prune import prune_
    from effllm.engine import LLM, SamplingParams
    from effllm.models import load_model, save_model
    from effllm.models.default import default_model_path

    model = load_model(default_model_path(), dtype=torch.float32, device="cpu")
    prune_(model, "magnitude", 0.9, progress=False)
    save_model(model, tmp_path / "p90")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = [{"prompt_token_ids": [5, 17, 230, 41, 9, 77]}]
    dense = LLM(str(tmp_path / "p90"), dtype="float32").generate(prompts, params, use_tqdm=False)
    sparse_llm = LLM(str(tmp_path / "p90"), dtype="float32", sparse_linears=0.85)
    assert sum(isinstance(m, SparseLinear) for m in sparse_llm.engine.runner.model.modules()) == 6 * 7
    sparse = sparse_llm.generate(prompts, params, use_tqdm=False)
    assert sparse[0].outputs[0].token_ids == dense[0].outputs[0].token_ids
    with pytest.raises(ConfigError, match="float32"):
        LLM(str(tmp_path / "p90"), dtype="bfloat16", sparse_linears=0.85)
