"""`CPUDecodeStep`: decode-only steps of a dense model on the CPU through one fused C call per step.

On a CPU a decode step of a small batch is a stream over the weights interleaved with about 190 small
PyTorch ops per layer (norms, RoPE, the KV write, views, each parallel op its own OpenMP fork and join);
at SmolLM-135M's size those ops, not the weights, set the step time. `kernels/cpu/decode_step.c` runs every
layer in one OpenMP region instead (the CPU counterpart of the CUDA graphs `cuda_graphs.py` captures).

A step takes this path when the engine runs the CPU's paged attention backend (an explicitly chosen
backend keeps its own attention), every request decodes one token, there are at most
`--cpu-fused-decode` of them (up to 64 for dense bfloat16 models on a CPU with AMX, whose products take
AMX tiles there; 16 otherwise) and the model still is what the kernel was set up for: float32 or bfloat16 dense linears,
palettized ones (`PalettizedLinear`, one bit width), symmetric 4-bit ones (`QuantizedLinear` W4A16, groups of
32-128, on CPUs with AVX-512 BF16) or 8-bit ones per channel (W8A16, W8A8), with q/k/v and gate/up
fused (`models/fused_projections`), a float32 or bfloat16 KV cache of the model's dtype, SiLU, no hooks
on the projections. Anything else (other quantized grids, an int8/int4 cache, prefill chunks, drafts,
SkipDecode's partial depths) takes the model's PyTorch forward, which is also its reference in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effllm.engine.kv_cache import PagedKVCache
from effllm.engine.step_layout import StepLayout
from effllm.kernels.cpu_decode_step import (
    MAX_ROWS,
    MAX_ROWS_AMX,
    LayerPointers,
    decode_step,
    decode_step_amx,
    decode_step_available,
    decode_step_dpbf16,
)
from effllm.models.decode_linear import DecodeLinear
from effllm.models.fused_projections import current
from effllm.models.palettized_linear import PalettizedLinear
from effllm.models.quantized_linear import QuantizedLinear
from effllm.models.transformer import CausalLM

DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class Extra:
    """What a layer's compressed matrices add to their weights: the kind, per matrix a table (palette or
    group scales) and row palettes, the bits or group size."""

    kind: str
    tables: tuple = ()
    row_palettes: tuple = ()
    bits: int = 0
    group: int = 0


def _palettes_fit(linears) -> bool:
    """Palettized matrices the kernel takes: one bit width and palette dtype (float32 or bfloat16)."""
    return (
        len({m.bits for m in linears}) == 1
        and len({m.palette.dtype for m in linears}) == 1
        and linears[0].palette.dtype in DTYPES
    )


def _w4_fits(linears) -> bool:
    """4-bit matrices the kernel takes: symmetric, 16-bit activations, one group of 32, 64 or 128 columns,
    K a multiple of 64, float32 or bfloat16 scales; only where AVX-512 BF16 runs its dot products (the
    per-module path's kernel is faster than the fused step's portable loop elsewhere)."""
    return (
        decode_step_dpbf16()
        and all(m.bits == 4 and m.symmetric and m.activation_bits == 16 for m in linears)
        and len({m.group_size for m in linears}) == 1
        and linears[0].group_size in (32, 64, 128)
        and all(m.in_features % 64 == 0 for m in linears)
        and len({m.weight_scale.dtype for m in linears}) == 1
        and linears[0].weight_scale.dtype in DTYPES
    )


def _w8_fits(linears) -> bool:
    """8-bit matrices the kernel takes: per channel, symmetric, all W8A16 or all W8A8, float32 or bfloat16
    scales."""
    return (
        all(m.bits == 8 and m.symmetric and m.group_size is None for m in linears)
        and len({m.activation_bits for m in linears}) == 1
        and len({m.weight_scale.dtype for m in linears}) == 1
        and linears[0].weight_scale.dtype in DTYPES
    )


class CPUDecodeStep:
    def __init__(self, model: CausalLM, cache: PagedKVCache, max_rows: int = MAX_ROWS_AMX):
        self.model, self.cache, self.max_rows = model, cache, min(max_rows, MAX_ROWS_AMX)
        c = model.config
        self.windows = torch.tensor([w or -1 for w in c.sliding_windows], dtype=torch.int64)
        self.scale = c.head_dim**-0.5
        self._signature: tuple | None = None
        self._layers: LayerPointers | None = None

    @classmethod
    def build(
        cls, model: CausalLM, cache: PagedKVCache, max_rows: int = MAX_ROWS_AMX
    ) -> CPUDecodeStep | None:
        """The fused step for `model`, or None when it cannot run it (see the module docstring)."""
        c = model.config
        suitable = (
            model.device.type == "cpu"
            and model.dtype in DTYPES
            and cache.kv_bits is None
            and cache.k[0].dtype == model.dtype
            and c.hidden_act == "silu"
            and c.head_dim % 2 == 0
            and max_rows > 0
            and decode_step_available()
        )
        step = cls(model, cache, max_rows) if suitable else None
        tensors = step._tensors() if step is not None else None
        if tensors is None:
            return None
        if not step._amx_products(tensors):  # the dot-product kernels win only up to MAX_ROWS rows
            step.max_rows = min(step.max_rows, MAX_ROWS)
        return step

    def _amx_products(self, tensors: list[tuple]) -> bool:
        """Whether the kernel multiplies on AMX tiles above MAX_ROWS rows: dense bfloat16 weights whose
        inputs (hidden, q, intermediate sizes) are multiples of 32, on a CPU with AMX-BF16."""
        c = self.model.config
        sizes = (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)
        return (
            tensors[0][1].kind == "dense"
            and self.model.dtype == torch.bfloat16
            and all(size % 32 == 0 for size in sizes)
            and decode_step_amx()
        )

    def _tensors(self) -> list[tuple] | None:
        """Per layer the tensors the kernel reads (weights, biases, norms) and what else a compressed layer
        needs (`Extra`), or None when a layer is none of plain fused dense, fused palettized, fused
        symmetric 4-bit or fused 8-bit per channel."""
        out = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = current(attn.__dict__.get("fused_qkv"), attn.q_proj, attn.k_proj, attn.v_proj)
            gu = current(mlp.__dict__.get("fused_gate_up"), mlp.gate_proj, mlp.up_proj)
            linears = (qkv, attn.o_proj, gu, mlp.down_proj)
            if any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in linears[1::2]):
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if all(type(m) in (DecodeLinear, torch.nn.Linear) for m in linears):
                out.append((tuple(t for m in linears for t in (m.weight, m.bias)) + norms, Extra("dense")))
            elif all(isinstance(m, PalettizedLinear) for m in linears) and _palettes_fit(linears):
                tensors = tuple(t for m in linears for t in (m.planes, m.bias)) + norms
                rows = tuple(m.palette_of_rows().to(torch.int32).contiguous() for m in linears)
                extra = Extra("palettized", tuple(m.palette for m in linears), rows, bits=linears[0].bits)
                out.append((tensors, extra))
            elif all(isinstance(m, QuantizedLinear) for m in linears) and _w4_fits(linears):
                tensors = tuple(t for m in linears for t in (m.weight_packed, m.bias)) + norms
                scales = tuple(m.weight_scale.contiguous() for m in linears)
                out.append((tensors, Extra("w4", scales, group=linears[0].group_size)))
            elif all(isinstance(m, QuantizedLinear) for m in linears) and _w8_fits(linears):
                int8 = linears[0].activation_bits == 8
                codes = tuple(m.weight if int8 else m.weight_packed for m in linears)
                tensors = tuple(t for m, c in zip(linears, codes, strict=True) for t in (c, m.bias)) + norms
                scales = tuple(m.weight_scale.contiguous() for m in linears)
                sums = tuple(c.sum(1, dtype=torch.int32).contiguous() for c in codes) if int8 else ()
                out.append((tensors, Extra("w8a8" if int8 else "w8", scales, sums)))
            else:
                return None
        if len({(e.kind, e.bits, e.group) for _, e in out}) != 1:  # one step takes one kind of layer
            return None
        return out

    def qualifies(self, layout: StepLayout) -> bool:
        return layout.all_decodes and layout.num_tokens <= self.max_rows

    def _fingerprint(self) -> tuple:
        """What the kernel's view depends on, read straight from the modules' dicts (this runs every step):
        each projection module's identity, weight storage and hook count, the fused modules' identities
        (their weights are the parts' storage), and the norm weights' and biases' storage and version (they
        are copied to float32)."""
        out = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            a, m = attn._modules, mlp._modules
            for mod in (
                a["q_proj"],
                a["k_proj"],
                a["v_proj"],
                a["o_proj"],
                m["gate_proj"],
                m["up_proj"],
                m["down_proj"],
            ):
                w, b = mod._parameters.get("weight"), mod._parameters.get("bias")
                if w is None:  # palettized or quantized: the planes or the codes
                    buffers = mod._buffers
                    w = buffers.get("planes", buffers.get("weight_packed", buffers.get("weight")))
                out += (
                    id(mod),
                    0 if w is None else w.data_ptr(),
                    len(mod._forward_hooks) + len(mod._forward_pre_hooks),
                    0 if b is None else b._version,
                )
            out += (id(attn.__dict__.get("fused_qkv")), id(mlp.__dict__.get("fused_gate_up")))
            for norm in (layer._modules["input_layernorm"], layer._modules["post_attention_layernorm"]):
                w = norm._parameters["weight"]
                out += (w.data_ptr(), w._version)
        return tuple(out)

    def _pointers(self) -> LayerPointers | None:
        """The kernel's view of the model, rebuilt when a module, a weight's storage or a copied tensor
        changed since (None when the model no longer qualifies)."""
        signature = self._fingerprint()
        if signature == self._signature:
            return self._layers
        layers = self._tensors()
        if layers is None:
            return None
        tensors = [ts for ts, _ in layers]
        copied = (1, 3, 5, 7, 8, 9)  # biases and norm weights, as float32 (the weights are read as they are)
        f32 = [
            [
                None if t is None or i not in copied else t.detach().float().contiguous()
                for i, t in enumerate(ts)
            ]
            for ts in tensors
        ]
        extras = [e for _, e in layers]
        self._layers = LayerPointers(
            w_qkv=[ts[0] for ts in tensors],
            b_qkv=[ts[1] for ts in f32],
            w_o=[ts[2] for ts in tensors],
            b_o=[ts[3] for ts in f32],
            w_gu=[ts[4] for ts in tensors],
            b_gu=[ts[5] for ts in f32],
            w_down=[ts[6] for ts in tensors],
            b_down=[ts[7] for ts in f32],
            norm_in=[ts[8] for ts in f32],
            norm_post=[ts[9] for ts in f32],
            k_cache=list(self.cache.k),
            v_cache=list(self.cache.v),
            kind=extras[0].kind,
            tables=[t for e in extras for t in e.tables],
            row_palettes=[r for e in extras for r in e.row_palettes],
            bits=extras[0].bits,
            group=extras[0].group,
        )
        self._signature = signature
        return self._layers

    @torch.inference_mode()
    def run(self, layout: StepLayout) -> torch.Tensor | None:
        """Final normed hidden states [B, hidden] of a decode-only step, or None when the model no longer
        qualifies (the caller then runs the PyTorch forward)."""
        layers = self._pointers()
        if layers is None:
            return None
        stack, c = self.model.model, self.model.config
        x = stack.embed(layout.input_ids).float().contiguous()  # [B, hidden]
        cos, sin = stack.rotary_emb(layout.positions[None], torch.float32)
        width = max(len(b) for b in layout.block_tables)
        tables = torch.tensor([b + [0] * (width - len(b)) for b in layout.block_tables], dtype=torch.int64)
        decode_step(
            x,
            cos[0].contiguous(),
            sin[0].contiguous(),
            layers,
            layout.slot_mapping,
            tables,
            torch.tensor(layout.seq_lens, dtype=torch.int64),
            self.windows,
            num_heads=c.num_attention_heads,
            intermediate_size=c.intermediate_size,
            eps=stack.layers[0].input_layernorm.eps,
            scale=self.scale,
            threads=torch.get_num_threads(),
        )
        return stack.norm(x.to(self.model.dtype))
