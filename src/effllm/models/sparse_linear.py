"""`SparseLinear`: a pruned linear layer run as a CSR sparse matrix product, for weights sparse enough
that skipping the zeros beats reading them.

    from effllm.models.sparse_linear import sparsify_linears_
    converted = sparsify_linears_(model, min_sparsity=0.9)   # decoder linears with >= 90% zeros

On CPU the product is MKL's CSR x dense (`torch.sparse.mm`), which exists only in float32; it loses to the
dense product at the sparsities pruning keeps a model usable (50%, and every N:M pattern: N:M has no CPU
kernel) and wins only near 90% at small batch (`effllm bench sparse-matmul` measures the crossover on the
machine at hand). So `effllm compress prune` stores a dense model with exact zeros, and the engine runs
`SparseLinear` only where asked (`--sparse-linears MIN_SPARSITY`). Inference only: no gradient, and the
model it converts is not saved as is (save the dense model).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.layouts import set_module


class SparseLinear(nn.Module):
    """y = x W^T + b with W held as a CSR tensor [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.float32:
            raise ConfigError(
                f"SparseLinear needs float32 weights (CPU CSR products exist only in float32), got {weight.dtype}; "
                "load the model with --dtype float32"
            )
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.register_buffer("weight", weight.detach().to_sparse_csr(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.sparsity = 1.0 - self.weight.values().numel() / weight.numel()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.3f}"
        )


def zero_share(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def sparsify_linears_(model: nn.Module, min_sparsity: float) -> int:
    """Replace, in place, every decoder-layer `nn.Linear` with at least `min_sparsity` zero weights by a
    `SparseLinear`; returns how many were replaced."""
    if not 0 < min_sparsity < 1:
        raise ConfigError(f"--sparse-linears takes a share of zero weights in (0, 1), got {min_sparsity}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError("sparsify_linears_ takes an EffLLM CausalLM")
    count = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear and zero_share(module.weight) >= min_sparsity:
                set_module(layer, name, SparseLinear.from_linear(module))
                count += 1
    return count
