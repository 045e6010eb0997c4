"""LISA and OwLore layer sampling: which blocks train, how often, and what happens to their state."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.core.errors import ConfigError
from effllm.optim import GaLoreAdamW, build_optimizer
from effllm.train.layer_sampling import OWLORE_LOW_RANK, LayerSampler, outlier_ratios


def make_llama(num_layers=4, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def lm_loss(model, input_ids):
    logits = getattr(model(input_ids), "logits", None)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def trainable_blocks(model):
    return tuple(
        i for i, layer in enumerate(model.model.layers) if all(p.requires_grad for p in layer.parameters())
    )


def frozen_blocks(model):
    return tuple(
        i
        for i, layer in enumerate(model.model.layers)
        if not any(p.requires_grad for p in layer.parameters())
    )


def test_lisa_trains_exactly_gamma_blocks_plus_embeddings_head_and_final_norm():
    model = make_llama()
    sampler = LayerSampler.lisa(model, num_active_layers=2, interval_steps=3)
    for step in range(12):
        sampler.on_step_begin(step)
        assert len(trainable_blocks(model)) == 2
        assert trainable_blocks(model) == sampler.active_layers
        assert len(frozen_blocks(model)) == 2
        for module in (model.model.embed_tokens, model.lm_head, model.model.norm):
            assert all(p.requires_grad for p in module.parameters())


def test_lisa_resamples_only_at_the_start_of_each_interval():
    model = make_llama()
    sampler = LayerSampler.lisa(model, num_active_layers=1, interval_steps=5, seed=3)
    resampled = [sampler.on_step_begin(step) for step in range(20)]
    assert resampled == [step % 5 == 0 for step in range(20)]
    draws = []
    for step in range(0, 200, 5):
        sampler.on_step_begin(step)
        draws.append(sampler.active_layers)
        sampler.on_step_begin(step + 4)
        assert sampler.active_layers == draws[-1]
    assert len(set(draws)) == 4  # every block gets its turn


def _inclusion_frequencies(sampler, draws):
    counts = torch.zeros(len(sampler.layers), dtype=torch.float64)
    for interval in range(draws):
        counts[list(sampler.sample(interval))] += 1
    return counts / draws


def _assert_frequencies(observed, expected, draws):
    # each block's count is binomial: allow five standard deviations
    tolerance = 5 * (expected * (1 - expected) / draws).sqrt()
    assert torch.all((observed - expected).abs() <= tolerance), (observed, expected)


def test_lisa_draws_blocks_uniformly():
    sampler = LayerSampler.lisa(make_llama(num_layers=4), num_active_layers=2)
    draws = 3000
    _assert_frequencies(
        _inclusion_frequencies(sampler, draws), torch.full((4,), 0.5, dtype=torch.float64), draws
    )


def test_blocks_that_freeze_release_their_optimizer_state():
    model = make_llama()
    sampler = LayerSampler.lisa(model, num_active_layers=2, interval_steps=1, seed=1)
    opt = build_optimizer("adamw", sampler.param_groups(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    sampler.on_step_begin(0, opt)
    lm_loss(model, ids).backward()
    opt.step()
    before = sampler.active_layers
    assert all(p in opt.state for i in before for p in model.model.layers[i].parameters())
    assert all(p not in opt.state for i in frozen_blocks(model) for p in model.model.layers[i].parameters())

    step = 1
    while set(sampler.active_layers) == set(before) or not set(sampler.active_layers) & set(before):
        sampler.on_step_begin(step, opt)
        step += 1
    kept, dropped = set(sampler.active_layers) & set(before), set(before) - set(sampler.active_layers)
    assert all(p in opt.state for i in kept for p in model.model.layers[i].parameters())
    assert all(
        p not in opt.state and p.grad is None for i in dropped for p in model.model.layers[i].parameters()
    )
    assert model.lm_head.weight in opt.state


def _plant_outliers(model, counts):
    """Small weights everywhere, plus `counts[ℓ]` weights of 100 in block ℓ."""
    with torch.no_grad():
        for layer, count in zip(model.model.layers, counts, strict=True):
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            for m in linears:
                m.weight.fill_(0.01)
            linears[0].weight.view(-1)[:count] = 100.0


def test_outlier_ratio_is_the_share_of_weights_above_threshold_times_the_block_mean():
    model = make_llama(num_layers=4)
    counts = [2, 6, 0, 12]
    _plant_outliers(model, counts)
    total = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    # the block mean stays far below 100/13 with at most 12 outliers among `total` weights
    assert outlier_ratios(model, threshold=13.0) == pytest.approx([c / total for c in counts])
    norms = {f"model.layers.{i}.self_attn.q_proj": torch.full((32,), 1e-6) for i in range(4)}
    for i in range(4):
        for name in ("k_proj", "v_proj", "o_proj"):
            norms[f"model.layers.{i}.self_attn.{name}"] = torch.ones(32)
        for name, width in (("gate_proj", 32), ("up_proj", 32), ("down_proj", 64)):
            norms[f"model.layers.{i}.mlp.{name}"] = torch.ones(width)
    assert outlier_ratios(model, input_norms=norms) == [0.0] * 4  # q_proj's inputs are tiny: no outliers


def test_owlore_draws_blocks_in_proportion_to_their_outlier_ratio():
    model = make_llama(num_layers=4)
    counts = [1, 2, 3, 4]
    _plant_outliers(model, counts)
    single = LayerSampler.owlore(model, num_active_layers=1, threshold=13.0)
    expected = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    torch.testing.assert_close(single.probabilities, expected)
    draws = 4000
    _assert_frequencies(_inclusion_frequencies(single, draws), expected, draws)

    # γ = 2: successive draws without replacement, as numpy.random.choice(replace=False, p=p)
    pair = LayerSampler.owlore(model, num_active_layers=2, threshold=13.0)
    inclusion = torch.zeros(4, dtype=torch.float64)
    for first, second in itertools.permutations(range(4), 2):
        probability = expected[first] * expected[second] / (1 - expected[first])
        inclusion[first] += probability
        inclusion[second] += probability
    _assert_frequencies(_inclusion_frequencies(pair, draws), inclusion, draws)


def test_owlore_groups_carry_galore_keys_on_block_matrices_and_include_frozen_blocks():
    model = make_llama(num_layers=4)
    _plant_outliers(model, [1, 2, 3, 4])
    sampler = LayerSampler.owlore(model, num_active_layers=2)
    sampler.on_step_begin(0)
    groups = sampler.param_groups(weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    low = groups[0]
    assert {k: low[k] for k in OWLORE_LOW_RANK} == OWLORE_LOW_RANK
    assert len(low["params"]) == 4 * 7
    GaLoreAdamW(groups, lr=1e-3)  # a drop-in: the groups build GaLore as they are


def test_a_resumed_sampler_draws_the_same_blocks():
    first = LayerSampler.lisa(make_llama(), num_active_layers=2, interval_steps=4, seed=9)
    resumed = LayerSampler.lisa(make_llama(), num_active_layers=2, interval_steps=4, seed=9)
    for step in range(10):
        first.on_step_begin(step)
    resumed.on_step_begin(9)  # the first call after resuming lands mid-interval
    assert resumed.active_layers == first.active_layers


def test_bad_configurations_raise_config_error():
    model = make_llama(num_layers=4)
    with pytest.raises(ConfigError, match="num_active_layers"):
        LayerSampler.lisa(model, num_active_layers=5)
    with pytest.raises(ConfigError, match="model.model.layers"):
        LayerSampler.lisa(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="lower the threshold"):
        LayerSampler.owlore(model, num_active_layers=2, threshold=1e6)
    with pytest.raises(ConfigError, match="probabilities"):
        LayerSampler(model, num_active_layers=2, probabilities=[1.0, 0.0, 0.0, 0.0])
