"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling their input channels
before rounding.

For linears that read the same input X (q/k/v; gate/up; down alone), with s_j = mean|X_j|^a normalised by
sqrt(max(s) min(s)), the reference grid-searches a in {0, 1/20, ..., 19/20} for the smallest output error
||X W^T - (X / s) Q(W s)^T||^2, where Q is round-to-nearest on the scheme's grid. The winning s is folded
into the operation before the linears, so the float model computes the same function: the RMSNorm's
weight (for q/k/v and gate/up) or the rows of up_proj (for down_proj) are divided by s, the linears'
columns multiplied by it. o_proj is scaled through v_proj only when their widths match (no GQA), as in
the reference. The reference's extra weight-clipping search is not done.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.compress.rtn import QuantSpec, rtn

GRID = 20


def search_scales(
    x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int = GRID
) -> torch.Tensor:
    """The per-input-channel scales s [K] that minimise the quantized output error on inputs x [T, K]."""
    x = x.float()
    w = torch.cat([t.float() for t in weights])
    target = x @ w.t()
    mean = x.abs().mean(0).clamp_min(1e-8)
    best, best_s = float("inf"), torch.ones_like(mean)
    for step in range(grid):
        s = mean.pow(step / grid)
        s = s / (s.max() * s.min()).sqrt()
        wq = rtn(w * s, spec).dequantize() / s
        err = (x @ wq.t() - target).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """previous' output channels / s (an RMSNorm's weight or a linear's rows), the linears' columns * s."""
    s = s.to(linears[0].weight.dtype)
    if isinstance(previous, nn.Linear):
        previous.weight.div_(s.unsqueeze(1))
        if previous.bias is not None:
            previous.bias.div_(s)
    else:
        previous.weight.div_(s)
    for linear in linears:
        linear.weight.mul_(s)
