"""One-shot pruning of a decoder's linear layers: magnitude, Wanda and SparseGPT, unstructured or N:M.

    from effllm.compress.prune import prune_
    prune_(model, "wanda", sparsity=0.5, pattern="2:4", calibration=ids)

Patterns: `unstructured` (a share `sparsity` of each matrix, per output row for Wanda, per matrix for
magnitude, per block of columns for SparseGPT, as their references choose) or `N:M` (N weights zeroed in
every M consecutive inputs of a row: 2:4 and 4:8 are 50%).

- magnitude: the smallest |W| (one threshold over the whole matrix; per M-group for N:M).
- Wanda (Sun et al. 2023, locuslab/wanda `prune_wanda`): scores |W_ij| * ||X_j||_2 over the calibration
  tokens the layer sees; the lowest per output row (unstructured) or per M-group of a row.
- SparseGPT (Frantar and Alistarh 2023, IST-DASLab/sparsegpt `fasterprune`): H = 2 X^T X / n with 1%
  dampening, the upper Cholesky factor of H^-1; columns in blocks of 128: the mask of a block is chosen
  from w^2 / [H^-1]_ii^2 (the block's lowest share over all rows; for N:M at every M-th column on the
  updated weights), each pruned column's error spread over the later columns (the OBS update) and the
  block's errors applied to the later blocks at once.

Calibration (Wanda, SparseGPT) runs layer by layer (`calibration.LayerByLayer`): each layer sees inputs
that went through the already pruned layers before it, as the references do. The result is a dense model
with exact zeros (on this CPU sparse matmul loses to dense at 50%, docs/compression.md): smaller only once
compressed or quantized, and the base for sparse hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from effllm.compress.calibration import LAYER_LINEARS, LINEAR_GROUPS, LayerByLayer
from effllm.compress.gptq import HessianAccumulator
from effllm.core.errors import ConfigError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or n zeros in every m consecutive inputs."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, spec: str) -> Pattern:
        if spec == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", spec)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise ConfigError(
                f"--pattern is unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8), not {spec!r}"
            )
        return cls(int(match.group(1)), int(match.group(2)))


def _check(sparsity: float, pattern: Pattern, in_features: int) -> None:
    if not pattern.structured and not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity must be in [0, 1), got {sparsity}")
    if pattern.structured and in_features % pattern.m:
        raise ConfigError(
            f"an {pattern.n}:{pattern.m} pattern needs in_features divisible by {pattern.m}, got {in_features}"
        )


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """True where pruned: the n lowest scores of every m consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    low = groups.topk(pattern.n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low, True).reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where pruned: the int(cols * sparsity) lowest scores of each row (a stable sort, as Wanda's)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :k], True)
    return mask


def lowest_share(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at or below the sorted score at index int(numel * sparsity), the references' `<=` threshold (so
    one more than the share, ties aside); nothing at sparsity 0."""
    k = int(scores.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores <= torch.sort(scores.flatten()).values[k]


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """One threshold over the whole matrix, or the n smallest |W| of every M-group for N:M."""
    scores = weight.abs().float()
    return nm_mask(scores, pattern) if pattern.structured else lowest_share(scores, sparsity)


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, pattern: Pattern
) -> torch.Tensor:
    """Wanda's mask from |W| * ||X_j||_2 (input_norm [in_features]: the column norms of the inputs)."""
    scores = weight.abs().float() * input_norm.float()[None, :]
    return nm_mask(scores, pattern) if pattern.structured else row_mask(scores, sparsity)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern = Pattern(),
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """The pruned weight [N, K] (float32) with SparseGPT's mask and OBS updates, under `hessian` [K, K]."""
    w = weight.detach().to(torch.float32).clone()
    k = w.shape[1]
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()
        errors = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        d = torch.diag(hinv1)
        if pattern.structured:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        else:
            mask = lowest_share(w1**2 / d[None, :] ** 2, sparsity)
        for i in range(b1 - b0):
            if pattern.structured and i % pattern.m == 0:
                scores = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m][None, :] ** 2
                low = scores.topk(pattern.n, dim=1, largest=False).indices
                mask[:, i : i + pattern.m].scatter_(1, low, True)
            col = w1[:, i]
            pruned = torch.where(mask[:, i], torch.zeros_like(col), col)
            err = (col - pruned) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = pruned
            errors[:, i] = err
        w[:, b0:b1] = w1
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return w


class _InputNorms:
    """Running sum over tokens of x_j^2 for one linear's inputs; `norm()` is ||X_j||_2."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).to(torch.float64).pow(2).sum(0)

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt().to(torch.float32)


@torch.no_grad()
def prune_(
    model: nn.Module,
    method: str,
    sparsity: float = 0.5,
    pattern: str | Pattern = "unstructured",
    calibration: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    progress: bool = True,
) -> dict[str, float]:
    """Prune every decoder linear of `model` in place; returns each one's share of zeros."""
    if method not in PRUNE_METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNE_METHODS)}")
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            _check(sparsity, pattern, module.in_features)
    if method != "magnitude" and calibration is None:
        raise ConfigError(f"--method {method} needs calibration ids")
    zeros: dict[str, float] = {}
    layers = list(enumerate(model.model.layers))
    runner = LayerByLayer(model, calibration) if method != "magnitude" else None
    for i, layer in tqdm(layers, desc=f"prune ({method})", disable=not progress, leave=False):
        if method == "wanda":  # the reference hooks every linear of the layer in one unpruned forward
            stats = {n: _InputNorms(layer.get_submodule(n).in_features) for n in LAYER_LINEARS}
            runner.run(layer, {n: s.add for n, s in stats.items()})
            for n in LAYER_LINEARS:
                _prune_linear(layer.get_submodule(n), method, sparsity, pattern, stats[n], damp, block_size)
        elif method == "sparsegpt":  # sequential groups: o_proj sees the pruned q, k, v; down the pruned up
            for names in LINEAR_GROUPS.values():
                stats = {n: HessianAccumulator(layer.get_submodule(n).in_features) for n in names}
                runner.run(layer, {n: s.add for n, s in stats.items()})
                for n in names:
                    _prune_linear(
                        layer.get_submodule(n), method, sparsity, pattern, stats[n], damp, block_size
                    )
        else:
            for n in LAYER_LINEARS:
                _prune_linear(layer.get_submodule(n), method, sparsity, pattern, None, damp, block_size)
        if runner is not None:
            runner.run(layer, advance=True)  # the next layer's inputs, through the pruned layer
        for n in LAYER_LINEARS:
            weight = layer.get_submodule(n).weight
            zeros[f"model.layers.{i}.{n}"] = float((weight == 0).float().mean())
    return zeros


def _prune_linear(
    linear: nn.Linear, method: str, sparsity: float, pattern: Pattern, stats, damp: float, block_size: int
) -> None:
    w = linear.weight
    if method == "magnitude":
        w.masked_fill_(magnitude_mask(w, sparsity, pattern), 0)
    elif method == "wanda":
        w.masked_fill_(wanda_mask(w, stats.norm(), sparsity, pattern), 0)
    else:
        w.copy_(sparsegpt(w, stats.hessian(), sparsity, pattern, damp, block_size).to(w.dtype))
