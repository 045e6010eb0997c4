"""bfloat16 linear layers on oneDNN's prepacked weights: the path Inductor's CPU freezing takes.

`torch.ops.mkldnn._reorder_linear_weight` lays a weight out once in oneDNN's blocked format;
`_linear_pointwise` then multiplies without reordering it on every call. On a CPU with AMX that is the
AMX-BF16 path: 1.5-2x `F.linear` for 16 to 256 rows on SmolLM-135M shapes (2-core Sapphire Rapids,
docs/benchmarks.md), less for wider batches. The packed copy is a second copy of the weight (the engine keeps
the plain one for its GEMV kernel at decode sizes and for everything else that reads `weight`); it is
used only while the weight it was made from is unchanged (same storage, no in-place write since).
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def packed_bf16_available() -> bool:
    """Whether this torch and CPU have oneDNN's bfloat16 linear (AVX-512 BF16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedWeight:
    """A bfloat16 weight [out, in] in oneDNN's layout, tied to the tensor it was packed from."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 64):
        self.out_features, self.in_features = weight.shape
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self._source = (weight.data_ptr(), weight._version)

    def matches(self, weight: torch.Tensor) -> bool:
        return self.data is not None and (weight.data_ptr(), weight._version) == self._source

    # oneDNN's opaque tensors have no storage to copy or pickle. A copied model gets this same pack, whose
    # source is not its weight (so it runs F.linear); a pickled one gets an empty pack.
    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return self

    def __getstate__(self) -> dict:
        return {**self.__dict__, "data": None, "_source": (0, -1)}

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] bfloat16 -> [..., out] bfloat16."""
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.data, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)
