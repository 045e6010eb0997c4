"""Fused projections for inference: q/k/v as one matrix and gate/up as one, so a decode step runs two
matrix-vector products where it ran five (fewer kernel launches, one pass over the input).

`fuse_projections(model)` concatenates the rows of each layer's q_proj, k_proj and v_proj (and of gate_proj
and up_proj) into one module kept beside them, outside the module tree, and makes the originals' tensors
views into it: no weight is stored twice, `state_dict()` keeps the Hugging Face names and layout, and a
saved model is unchanged. Dense (`nn.Linear`), quantized (`QuantizedLinear`, symmetric grids: its
tensors are per row; `QoQLinear`, all of whose tensors are per row) and palettized (`PalettizedLinear`: the
parts' palettes concatenated, each row told its own by `row_palette`) projections fuse when the three (or two) share their type and grid. Attention and
the MLP take the fused module while it still fuses the modules they hold (`current`). Training never calls this; the engine does, on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.models.decode_linear import DecodeLinear
from effllm.models.lora import is_lora
from effllm.models.multi_lora import is_multi_lora
from effllm.models.palettized_linear import PalettizedLinear
from effllm.models.qoq_linear import QoQLinear
from effllm.models.quantized_linear import QuantizedLinear

_ROW_TENSORS = ("weight_packed", "weight", "weight_scale", "qweight", "group_scale", "group_zero", "planes")


def _grid(m: nn.Module):
    if is_lora(m) or is_multi_lora(m):  # an adapter adds its own product: the module must run itself
        return None
    if isinstance(m, PalettizedLinear):  # rows keep their palettes (the fused module's row_palette)
        return ("palette", m.bits, m.in_features, m.palette.dtype, m.row_palette is None)
    if isinstance(m, QoQLinear):  # every tensor is per row, activations per token: fusing is exact
        return ("qoq", m.group_size, m.in_features, m.weight_scale.dtype)
    if isinstance(m, QuantizedLinear):
        return (
            "q",
            m.bits,
            m.group_size,
            m.symmetric,
            m.activation_bits,
            m.in_features,
            m.weight_scale.dtype,
        )
    if isinstance(m, nn.Linear):
        return ("dense", m.in_features, m.weight.dtype, m.weight.device)
    return None


def fuse_rows(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([p(x) for p in parts], -1), the parts' tensors turned into views of
    its own; None when the parts cannot share one (different types or grids, asymmetric 4-bit zeros)."""
    grids = {_grid(p) for p in parts}
    if len(grids) != 1 or None in grids:
        return None
    first = parts[0]
    sizes = [p.out_features for p in parts]
    bias = [p.bias for p in parts]
    if any(b is None for b in bias) and not all(b is None for b in bias):
        return None
    if isinstance(first, PalettizedLinear):
        fused = PalettizedLinear(
            first.in_features,
            sum(sizes),
            bias[0] is not None,
            first.bits,
            sum(sizes),
            dtype=first.palette.dtype,
            device=first.palette.device,
        )
        fused.planes = torch.cat([p.planes for p in parts])
        fused.palette = torch.cat([p.palette for p in parts])
        offsets = torch.tensor([0] + [p.palette.shape[0] for p in parts]).cumsum(0)
        fused.row_palette = torch.cat(
            [p.palette_of_rows().to(torch.int32) + int(o) for p, o in zip(parts, offsets, strict=False)]
        )
    elif isinstance(first, QoQLinear):
        fused = QoQLinear(
            first.in_features,
            sum(sizes),
            bias[0] is not None,
            first.group_size,
            dtype=first.weight_scale.dtype,
            device=first.weight_scale.device,
        )
        for name in _ROW_TENSORS:
            if name in first._buffers:
                setattr(fused, name, torch.cat([getattr(p, name) for p in parts]))
    elif isinstance(first, QuantizedLinear):
        if not first.symmetric:
            return None
        fused = QuantizedLinear(
            first.in_features,
            sum(sizes),
            bias[0] is not None,
            first.bits,
            first.group_size,
            True,
            first.activation_bits,
            dtype=first.weight_scale.dtype,
            device=first.weight_scale.device,
        )
        for name in _ROW_TENSORS:
            if name in first._buffers:
                setattr(fused, name, torch.cat([getattr(p, name) for p in parts]))
        fused._runtime = None
    else:
        fused = DecodeLinear(first.in_features, sum(sizes), bias=bias[0] is not None, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if bias[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in bias]), requires_grad=False)
    start = palette_start = 0
    for p, size in zip(parts, sizes, strict=True):  # the parts now read the fused tensors (no second copy)
        rows = slice(start, start + size)
        if isinstance(p, PalettizedLinear):  # palettes by row count: the parts' palettes, in order
            p._buffers["planes"] = fused.planes[rows]
            p._buffers["palette"] = fused.palette[palette_start : palette_start + p.palette.shape[0]]
            palette_start += p.palette.shape[0]
        elif isinstance(p, (QuantizedLinear, QoQLinear)):
            for name in _ROW_TENSORS:
                if name in p._buffers:
                    p._buffers[name] = fused._buffers[name][rows]
            p._runtime = None
        else:
            p.weight = nn.Parameter(fused.weight[rows], requires_grad=p.weight.requires_grad)
        if p.bias is not None:
            p.bias = nn.Parameter(fused.bias[rows], requires_grad=p.bias.requires_grad)
        start += size
    fused.split_sizes = sizes
    fused.__dict__["parts"] = tuple(parts)  # plain attribute: not submodules
    fused.__dict__["storage"] = tuple(_storage(p) for p in parts)
    return fused


def _storage(part: nn.Module) -> int:
    """Where a part's weights live (its first row tensor's data pointer)."""
    for name in ("weight", *_ROW_TENSORS):
        t = part._parameters.get(name)
        t = part._buffers.get(name) if t is None else t
        if t is not None:
            return t.data_ptr()
    return 0


def current(fused: nn.Module | None, *parts: nn.Module) -> nn.Module | None:
    """`fused` when it still fuses exactly `parts` and may stand in for them: a swapped projection (e.g. by
    quantize_), a part whose weights were replaced rather than changed in place (`weight.data = ...`, as
    smoothing folds do), or a part with forward hooks (calibration observes its inputs) retires it."""
    if fused is None or len(fused.parts) != len(parts):
        return None
    for a, b, ptr in zip(fused.parts, parts, fused.storage, strict=True):
        if a is not b or b._forward_pre_hooks or b._forward_hooks or _storage(b) != ptr:
            return None
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every decoder layer in place; returns how many fused modules were made."""
    count = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner, names, slot in (
            (attn, ("q_proj", "k_proj", "v_proj"), "fused_qkv"),
            (mlp, ("gate_proj", "up_proj"), "fused_gate_up"),
        ):
            fused = fuse_rows([getattr(owner, n) for n in names])
            if fused is not None:
                owner.__dict__[slot] = fused  # not a submodule: state_dict() keeps the original names
                count += 1
    return count
