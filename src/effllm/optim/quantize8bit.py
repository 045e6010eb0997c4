"""Blockwise 8-bit quantization of optimizer state with a dynamic (tree-like) code.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022): the tensor is cut into
blocks of B values, each block is scaled by its absolute maximum N_b, and each scaled value
is stored as the index of the nearest entry of a 256-value code. The dynamic code spends its entries
across seven decades, [0.1, 1]·10^-e for e = 0..6 with finer steps in the larger decades, so both the
first moment (signed) and the second moment (unsigned, spanning many orders of magnitude) keep their
relative precision. Plain torch, so it runs on any device (no bitsandbytes).
"""

import torch
import torch.nn.functional as F

_DECADES = 7


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1] (unsigned), 0 and 1 included."""
    fraction_bits = 6 if signed else 7  # the sign takes one of the 8 bits
    values = [0.0, 1.0]
    for decade in range(_DECADES):
        bins = 2 ** (fraction_bits - decade)
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float64)
        centers = ((edges[:-1] + edges[1:]) / 2 * 10.0**-decade).tolist()
        values += centers
        if signed:
            values += [-v for v in centers]
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (uint8 indices [x.numel()], per-block absmax float32 [ceil(numel / block_size)])."""
    flat = x.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = code.to(x.device)
    midpoints = (code[1:] + code[:-1]) / 2
    indices = torch.bucketize(scaled, midpoints, out_int32=True)  # nearest code entry
    return indices.view(-1)[: flat.numel()].to(torch.uint8), absmax


def dequantize_blockwise(
    indices: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block_size: int,
    shape: torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The inverse of `quantize_blockwise`: code[index] · absmax of the index's block."""
    values = code.to(indices.device)[indices.int()]
    blocks = F.pad(values, (0, -values.numel() % block_size)).view(-1, block_size) * absmax[:, None]
    return blocks.view(-1)[: values.numel()].view(shape).to(dtype)
