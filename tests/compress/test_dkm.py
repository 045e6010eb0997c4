"""DKM weight clustering: one differentiable k-means step against coremltools' DKMPalettizer from the same
centroids (bit for bit, float64), the tau -> 0 limit (a hard Lloyd step), gradients reaching the weights,
and at most 2^bits values after finalising (training: tests/train/test_dkm_training.py)."""

import logging

import pytest
import torch

from effllm.compress.dkm import DKMWeight, apply_dkm, finalize_dkm, hard_palettize, kmeans_1d, soft_palettize
from effllm.core.errors import ConfigError


def test_one_step_equals_coremltools_dkm_palettizer():
    pytest.importorskip("coremltools")
    logging.disable(logging.WARNING)  # coremltools' import warns about its native libraries
    try:
        from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig
    finally:
        logging.disable(logging.NOTSET)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).double()
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    centroids = [kmeans_1d(w, 4).double() for w in weights]
    options = {"n_bits": 2, "weight_threshold": 256, "kmeans_max_iter": 3}
    palettizer = DKMPalettizer(model, DKMPalettizerConfig.from_dict({"global_config": options}))
    prepared = palettizer.prepare(inplace=False)
    fakes = [prepared[0].weight_fake_quant, prepared[2].weight_fake_quant]
    for fake, c in zip(fakes, centroids, strict=True):
        fake.centroids = [c.view(-1, 1).clone()]  # their k-means++ seeding replaced by the same centroids
    palettizer.step()
    prepared.train()
    for fake, w, c in zip(fakes, weights, centroids, strict=True):
        theirs = fake(w.clone().requires_grad_(True))
        ours, new = soft_palettize(w.clone().requires_grad_(True), c, tau=1e-4, iters=3)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
        torch.testing.assert_close(new, fake.centroids[0].view(-1), rtol=0, atol=1e-12)


def test_small_tau_is_a_hard_lloyd_step_and_gradients_reach_the_weights():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = kmeans_1d(w, 8, iters=2).double()
    soft, new = soft_palettize(w, c, tau=1e-12, iters=1)
    labels = (w.reshape(-1, 1) - c[None]).square().argmin(1)
    means = torch.stack([w.reshape(-1)[labels == k].mean() for k in range(8)])
    # Every other centroid keeps the assignment's floor of 1e-7 per weight (coremltools' clamp), which moves
    # the means of the sparse outer clusters by ~1e-5; the assignment itself is the hard one.
    torch.testing.assert_close(new, means, rtol=0, atol=1e-4)
    torch.testing.assert_close(soft, new[labels].view(w.shape), rtol=0, atol=1e-6)
    x = w.clone().requires_grad_(True)
    soft_palettize(x, c, tau=1e-2, iters=3)[0].square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert hard_palettize(w, c).unique().numel() <= 8


def test_finalised_model_has_at_most_two_to_the_bits_values():
    from effllm.models import CausalLM, ModelConfig

    model = CausalLM(
        ModelConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert apply_dkm(model, bits=3) == 14
    model.train()
    model(torch.randint(0, 64, (2, 8))).sum().backward()  # training forward: soft weights, gradients flow
    q = model.model.layers[0].self_attn.q_proj
    assert q.parametrizations.weight.original.grad is not None
    counts = finalize_dkm(model)
    assert len(counts) == 14 and max(counts.values()) <= 8
    assert (
        "parametrizations"
        not in dict(model.named_modules())["model.layers.0.self_attn.q_proj"].__dict__["_modules"]
    )
    with pytest.raises(ConfigError, match="dkm-bits"):
        DKMWeight(bits=9)
