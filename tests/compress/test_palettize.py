"""Palettization: post-training k-means against coremltools' PostTrainingPalettizer (per tensor and per
grouped channel), DKM's learned centroids stored as the palettes (the same weights as finalising DKM),
and every weight on its palette's nearest value."""

import logging

import pytest
import torch
from torch import nn

from effllm.compress.dkm import apply_dkm, finalize_dkm
from effllm.compress.palettize import nearest, palettize_, palettize_dkm_, palettize_linear
from effllm.core.errors import ConfigError
from effllm.models.palettized_linear import PalettizedLinear

from .conftest import quant_model


def coremltools_palettized(weight, bits, rows_per_palette):
    pytest.importorskip("coremltools")
    logging.disable(logging.WARNING)  # coremltools' import and k-means log at INFO/WARNING
    try:
        from coremltools.optimize.torch.palettization import (
            PostTrainingPalettizer,
            PostTrainingPalettizerConfig,
        )

        options = {"n_bits": bits, "granularity": "per_tensor"}
        if rows_per_palette:
            options.update(granularity="per_grouped_channel", group_size=rows_per_palette)
        model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        model[0].weight.data = weight.clone()
        config = PostTrainingPalettizerConfig.from_dict({"global_config": options})
        return PostTrainingPalettizer(model, config).compress()[0].weight.detach()
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("bits, rows", [(3, None), (4, None), (2, 16)])
def test_kmeans_palettes_are_as_good_as_coremltools(bits, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False)
    ours = palettize_linear(linear, bits, rows).dequantized_weight()
    theirs = coremltools_palettized(linear.weight.detach(), bits, rows)
    w = linear.weight.detach()
    for dense in (ours, theirs):  # the same granularity: at most 2^bits values per group of rows
        assert max(g.unique().numel() for g in dense.view(-1, rows or 64, 256)) <= 2**bits
    ours_error, theirs_error = (ours - w).square().mean(), (theirs - w).square().mean()
    assert ours_error <= 1.05 * theirs_error, (float(ours_error), float(theirs_error))


def test_each_weight_takes_its_nearest_palette_value():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32, bias=True)
    module = palettize_linear(linear, 3, rows_per_palette=8)
    w = linear.weight.detach()
    for g in range(4):
        rows = slice(8 * g, 8 * g + 8)
        palette = module.palette[g]
        best = (w[rows, :, None] - palette).abs().min(-1).values
        assert torch.allclose((module.dequantized_weight()[rows] - w[rows]).abs(), best)
    assert torch.equal(module.bias, linear.bias.detach())


def test_nearest_works_in_chunks_as_in_one_piece(monkeypatch):
    from effllm.compress import palettize

    weight, centroids = torch.randn(300, 70), torch.randn(8)
    distance = (weight.reshape(-1, 1) - centroids).square()
    distance[:, 0] -= 1e-7  # DKM's (and coremltools') rule for the first centroid
    monkeypatch.setattr(palettize, "NEAREST_PAIRS", 8 * 1000)  # chunks of 1000 weights, the last one short
    assert torch.equal(nearest(weight, centroids), distance.argmin(1).view(weight.shape))


def test_palettize_skips_the_head_and_records_the_layout(model):
    count = palettize_(model, 4, show_progress=False)
    assert count == 14 and type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, PalettizedLinear)
    assert model.config.effllm["compression"] == {
        "format": "palettized",
        "bits": 4,
        "rows_per_palette": None,
        "ignore": ["lm_head"],
    }
    with pytest.raises(ConfigError, match="does not divide"):
        palettize_(quant_model(), 4, rows_per_palette=48, show_progress=False)


def test_dkm_centroids_become_the_palettes_with_finalised_dkm_s_weights():
    model, twin = quant_model(), quant_model()
    for m in (model, twin):
        apply_dkm(m, bits=2)
        m.train()
        m(torch.randint(0, 96, (2, 8))).sum().backward()  # one training forward: centroids refined
    with torch.no_grad():  # the same centroids in both
        for (_, a), (_, b) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
            b.copy_(a)
    used = palettize_dkm_(model)
    finalize_dkm(twin)
    assert len(used) == 14 and max(used.values()) <= 4
    for name, module in model.named_modules():
        if isinstance(module, PalettizedLinear):
            assert module.bits == 2 and module.palette.shape == (1, 4)
            torch.testing.assert_close(
                module.dequantized_weight(), twin.get_submodule(name).weight, rtol=0, atol=0
            )
    assert model.config.effllm["compression"]["ignore"] == ["lm_head"]
    with pytest.raises(ConfigError, match="--method dkm"):
        palettize_dkm_(quant_model())
