"""LLM-Pruner's structured pruning: group removal equals zeroing, Taylor saliency equals autograd's, and the
smaller checkpoint loads in transformers with EffLLM's logits."""

import pytest
import torch
import torch.nn.functional as F

from effllm.compress.structured import group_importance, prune_structured, remove_groups, taylor_saliency
from effllm.core.errors import ConfigError
from effllm.models.checkpoint import save_model
from effllm.models.config import ModelConfig
from effllm.models.transformer import CausalLM


def tiny(layers=2, seed=0, model_type="llama"):
    torch.manual_seed(seed)
    config = ModelConfig(
        model_type=model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        qkv_bias=model_type == "qwen2",
    )
    return CausalLM(config).eval()


IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))


def test_removing_a_kv_group_equals_zeroing_its_heads_output_columns():
    model = tiny()
    small = remove_groups(
        model, [torch.tensor([], dtype=torch.long)] * 2, [torch.tensor([1]), torch.tensor([0])]
    )
    assert small.config.num_key_value_heads == 1 and small.config.num_attention_heads == 2
    zeroed = tiny()
    with torch.no_grad():
        zeroed.model.layers[0].self_attn.o_proj.weight[:, 32:64] = 0  # q heads 2, 3 read KV group 1
        zeroed.model.layers[1].self_attn.o_proj.weight[:, 0:32] = 0
        torch.testing.assert_close(small(IDS), zeroed(IDS))


def test_removing_mlp_channels_equals_zeroing_their_down_columns():
    model = tiny()
    drop = [torch.tensor([0, 5, 7]), torch.tensor([1, 2, 40])]
    small = remove_groups(model, drop, [])
    assert small.config.intermediate_size == 45
    with torch.no_grad():
        for layer, d in zip(model.model.layers, drop, strict=True):
            layer.mlp.down_proj.weight[:, d] = 0
        torch.testing.assert_close(small(IDS), model(IDS))


def test_first_order_saliency_is_w_times_the_autograd_gradient():
    model = tiny(layers=1)
    saliency = taylor_saliency(model, IDS, "first", batch_size=4)  # one batch
    loss = F.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
    w = model.model.layers[0].mlp.up_proj.weight
    (g,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(saliency["model.layers.0.mlp.up_proj.weight"], (w * g).abs().detach())
    scores = group_importance(model, saliency)
    assert scores[0][0].shape == (48,) and scores[0][1].shape == (2,)
    with pytest.raises(ConfigError, match="--importance"):
        taylor_saliency(model, IDS, "third")


@pytest.mark.parametrize("importance", ["first", "second", "mix"])
def test_pruned_checkpoint_loads_in_transformers_with_our_logits(tmp_path, importance):
    transformers = pytest.importorskip("transformers")
    small = prune_structured(tiny(), IDS, mlp_ratio=0.25, kv_group_ratio=0.5, importance=importance)
    assert small.config.intermediate_size == 36 and small.config.num_key_value_heads == 1
    save_model(small, tmp_path / "small")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "small", torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, small(IDS), rtol=1e-4, atol=1e-4)


def test_ratios_that_need_per_layer_widths_or_break_loading_are_refused():
    with pytest.raises(ConfigError, match="multiple of 1/2"):
        prune_structured(tiny(), IDS, kv_group_ratio=0.25)
    with pytest.raises(ConfigError, match="qwen2"):
        prune_structured(tiny(model_type="qwen2"), IDS, kv_group_ratio=0.5)
    small = prune_structured(tiny(model_type="qwen2"), IDS, mlp_ratio=0.5)  # MLP channels only: fine
    assert small.config.intermediate_size == 24


def test_obs_column_removal_is_the_least_squares_fit_of_the_remaining_columns():
    from effllm.compress.structured import obs_remove_columns

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    x[:, 3] += x[:, 5]  # correlated inputs, so the other columns can take over part of the removed ones
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    remove = torch.tensor([3, 7, 8])
    got = obs_remove_columns(w, x.T @ x, remove, damp=0.0).double()
    keep = torch.tensor([i for i in range(12) if i not in {3, 7, 8}])
    fit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # argmin ||X W^T - X_K V^T||
    assert (got[:, remove] == 0).all()
    torch.testing.assert_close(got[:, keep], fit.float().double(), rtol=1e-4, atol=1e-4)
    # It beats plain zeroing, and removing nothing changes nothing.
    zeroed = w.clone()
    zeroed[:, remove] = 0
    assert (x @ (w - got).T).norm() < 0.9 * (x @ (w - zeroed).T).norm()
    torch.testing.assert_close(obs_remove_columns(w, x.T @ x, torch.tensor([], dtype=torch.long)), w.float())


def test_obs_column_removal_ignores_inputs_that_never_fire():
    from effllm.compress.structured import obs_remove_columns

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=gen)
    x[:, 2] = 0  # a column removed earlier: its input is always zero
    w = torch.randn(3, 8, generator=gen)
    got = obs_remove_columns(w, x.T @ x, torch.tensor([4]))
    assert torch.isfinite(got).all() and (got[:, 4] == 0).all()
    assert (x @ (w - got).T).norm() < (x[:, 4:5] @ w[:, 4:5].T).norm()
