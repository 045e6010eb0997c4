"""Palettization: each weight matrix as a small palette of values plus a `bits`-bit index per weight.

    palettize_(model, bits=3)                     # post-training: k-means per matrix (or per group of rows)
    palettize_dkm_(model)                         # after DKM training: its learned centroids are the palettes

Both swap the decoder's linears for `models.palettized_linear.PalettizedLinear` and write config.json's
`effllm.compression` section (`palettized`), so `save_model` stores the palettes and bit-plane indices and
every EffLLM command loads them back. Post-training palettization is coremltools' k-means palettizer
(`OpKMeansPalettizerConfig`, per tensor or per grouped channel): 1-D k-means++ and Lloyd's iterations on
the weights, each weight assigned its nearest centroid. DKM (`compress/dkm.py`) learns the palettes in
training instead, and its centroids are stored as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from effllm.compress.dkm import PRUNE_THRESHOLD, DKMWeight, kmeans_1d
from effllm.core.errors import ConfigError
from effllm.eval.progress import progress_bar
from effllm.models.layouts import set_module
from effllm.models.palettized_linear import PalettizedLinear, palettized_section
from effllm.models.quantized_linear import _matches

NEAREST_PAIRS = 1 << 24  # weight-centroid distances held at a time by `nearest` (64 MB)


def nearest(weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each weight's nearest centroid's index (DKM's rule: the first centroid's distance less 1e-7)."""
    flat, c = weight.reshape(-1, 1).float(), centroids.float().reshape(1, -1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=weight.device)
    chunk = max(1, NEAREST_PAIRS // c.shape[1])
    for start in range(0, flat.shape[0], chunk):
        distance = (flat[start : start + chunk] - c).square()
        distance[:, :1] -= PRUNE_THRESHOLD
        out[start : start + chunk] = distance.argmin(dim=1)
    return out.view(weight.shape)


def palettize_linear(
    linear: nn.Module,
    bits: int,
    rows_per_palette: int | None = None,
    palettes: torch.Tensor | None = None,
    seed: int = 0,
    weight: torch.Tensor | None = None,
) -> PalettizedLinear:
    """`linear` (or `weight`, with `linear`'s bias) as a `PalettizedLinear`: `palettes` [N / R, 2^bits]
    given (DKM), or found by k-means on each group of R rows; every weight takes its palette's nearest
    value."""
    weight = (linear.weight if weight is None else weight).detach()
    out_features, in_features = weight.shape
    module = PalettizedLinear(
        in_features,
        out_features,
        linear.bias is not None,
        bits,
        rows_per_palette,
        weight.dtype,
        weight.device,
    )
    groups = weight.view(-1, module.rows_per_palette, in_features)
    if palettes is None:
        palettes = torch.stack([kmeans_1d(g, 2**bits, seed=seed + i) for i, g in enumerate(groups)])
    indices = torch.cat([nearest(g, p) for g, p in zip(groups, palettes, strict=True)])
    module.set_indices(indices, palettes)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module


def _targets(model: nn.Module, skip: list[str]) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name and not _matches(name, skip)
    }


def palettize_(
    model: nn.Module,
    bits: int,
    rows_per_palette: int | None = None,
    skip: list[str] | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> int:
    """Post-training k-means palettization of every linear not in `skip` (default: the head), in place;
    records the layout in `model.config.effllm`; returns how many layers were palettized."""
    skip = ["lm_head"] if skip is None else skip
    targets = _targets(model, skip)
    if not targets:
        raise ConfigError("the model has no linear layers to palettize (all skipped?)")
    for name, linear in targets.items():
        if rows_per_palette is not None and linear.out_features % rows_per_palette:
            raise ConfigError(
                f"--rows-per-palette {rows_per_palette} does not divide {name}'s {linear.out_features} rows"
            )
        if linear.in_features % 32:
            raise ConfigError(
                f"{name} has {linear.in_features} inputs; palettized layers need a multiple of 32"
            )
    with progress_bar(len(targets), "palettize", show_progress, unit="matrix") as bar:
        for i, (name, linear) in enumerate(targets.items()):
            set_module(model, name, palettize_linear(linear, bits, rows_per_palette, seed=seed + i))
            bar.update(1)
    model.config.effllm["compression"] = palettized_section(bits, rows_per_palette, skip)
    return len(targets)


@torch.no_grad()
def palettize_dkm_(model: nn.Module) -> dict[str, int]:
    """Every DKM-parametrized linear as a `PalettizedLinear` holding its learned centroids, in place (the
    palettized weights equal `finalize_dkm`'s hard palette); records the layout. Returns, per module, the
    number of palette values its weights use."""
    used, bits_seen = {}, set()
    ignore = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and module.in_features % 32:
            raise ConfigError(
                f"{name} has {module.in_features} inputs; palettized layers need a multiple of 32"
            )
    for name, module in list(model.named_modules()):
        if not (
            parametrize.is_parametrized(module, "weight")
            and isinstance(module.parametrizations.weight[0], DKMWeight)
        ):
            if isinstance(module, nn.Linear) and name:
                ignore.append(name)
            continue
        dkm = module.parametrizations.weight[0]
        weight = dkm.clustered(module.parametrizations.weight.original.detach())
        if not bool(dkm.initialised):  # never ran a forward: centroids as its first forward would make them
            dkm.centroids.copy_(kmeans_1d(weight, 2**dkm.bits, seed=dkm.seed))
            dkm.initialised.fill_(True)
        new = palettize_linear(module, dkm.bits, palettes=dkm.centroids[None].to(weight.dtype), weight=weight)
        set_module(model, name, new)
        used[name] = int(new.indices().unique().numel())
        bits_seen.add(dkm.bits)
    if not used:
        raise ConfigError("the model has no DKM-clustered weights to palettize (train with --method dkm)")
    if len(bits_seen) != 1:
        raise ConfigError(
            f"DKM layers use different bit widths {sorted(bits_seen)}; one palettized layout takes one"
        )
    model.config.effllm["compression"] = palettized_section(bits_seen.pop(), None, ignore)
    return used
