"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each rounding error compensated by an
update of the columns not yet quantized, using the inverse Hessian of the layer's reconstruction loss.

For a linear layer with inputs X (tokens x K), the loss ||W X^T - Q X^T||^2 has Hessian H = 2 X^T X / n.
The reference algorithm, followed here: dampen H by `damp` (0.01) times its mean diagonal; take the
upper Cholesky factor U of H^-1; walk the columns in blocks of 128, rounding column i onto the grid and
spreading its error e = (w_i - q_i) / U_ii over the later columns of the block (row i of U), then apply
the whole block's errors to the columns after it at once (the "lazy batch" update). Dead inputs (zero
diagonal) get zero weights. `act_order` visits columns by decreasing H_ii; the group scales are then
fixed up front from the original weights ("static groups"), so the stored layout needs no g_idx.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from effllm.compress.rtn import QuantizedWeight, QuantSpec, dequantize, quant_params, quantize


class HessianAccumulator:
    """Running H = 2/n sum x x^T over every token a linear layer sees (float64 for the sums)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.h += x.t() @ x
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2 * self.h / max(self.n, 1)).to(torch.float32)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    grid: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> QuantizedWeight:
    """Quantize `weight` [N, K] on `spec`'s grid, minimising the output error under `hessian` [K, K].

    `grid(columns [N, group]) -> (scale [N, 1], zero [N, 1] or None)` replaces round-to-nearest's grid of
    each group (QoQ's progressive grid uses it); it needs groups and no act_order."""
    if grid is not None and (spec.group_size is None or act_order):
        raise ValueError("a custom grid needs groups and act_order=False")
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    group = spec.group_size or k
    if spec.group_size is not None and block_size % group:  # every group must lie inside one block
        block_size = group * max(1, block_size // group)
    static = act_order and spec.group_size is not None
    scale = torch.empty(n, spec.groups(k))
    zero = None if spec.symmetric else torch.empty(n, spec.groups(k))
    if static or spec.group_size is None:  # every group's grid from the (dead-zeroed) original weights
        s, z = quant_params(w, spec)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(n, k, dtype=torch.int8)
    column_spec = QuantSpec(spec.bits, None, spec.symmetric)  # one column against its group's (s, z)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()
        errors = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = perm[b0 + i].item()
            g = col // group
            if not static and spec.group_size is not None and col % group == 0:  # a group starts here
                columns = w1[:, i : i + group]
                s, z = (
                    grid(columns)
                    if grid
                    else quant_params(columns, QuantSpec(spec.bits, None, spec.symmetric))
                )
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            sg = scale[:, g : g + 1]
            zg = None if zero is None else zero[:, g : g + 1]
            qi = quantize(w1[:, i : i + 1], sg, zg, column_spec)
            q[:, b0 + i] = qi[:, 0]
            err = (w1[:, i] - dequantize(qi, sg, zg, column_spec)[:, 0]) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    inverse = torch.argsort(perm)
    return QuantizedWeight(q[:, inverse].contiguous(), scale, zero, spec)
