"""Attention backends over the paged KV cache: what the model's attention layers call in an engine step.

The model runner flattens a step into one sequence of tokens (single-token queries first, then multi-token
chunks), calls `prepare(layout)` once with the step's `StepLayout`, then runs the model; every attention
layer calls the backend with its new q, k, v. The backend has the cache store k and v at the step's slots
and attends each query over its own sequence's keys. Everything per step (block tables, masks) is built in
`prepare` or once per distinct window, never per layer, and nothing in a layer waits on the host.

Backends are chosen by name from `BACKENDS` (`EngineConfig.attention_backend`); a new backend is a class
with `prepare(layout)` and `__call__(layer_idx, q, k, v, window=, scale=)` plus one entry there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from effllm.core.errors import ConfigError
from effllm.engine.kv_cache import PagedKVCache
from effllm.engine.step_layout import StepLayout
from effllm.kernels import paged_attention
from effllm.kernels.attention import sdpa_attention
from effllm.kernels.cpu_paged_attention import (
    KERNEL_DTYPES,
    cpu_kernel_available,
    paged_decode_attention_cpu,
    split_rows,
)
from effllm.kernels.paged_attention import (
    decode_key_mask,
    paged_attention_triton,
    paged_decode_attention,
    paged_prefill_attention,
)


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first query in the flattened step
    end: int
    num_computed: int  # keys cached before the chunk (its first query's position)
    block_ids: torch.Tensor  # [blocks] covering the chunk's last position


# Multi-token queries up to this long (a request verifying drafts) attend row by row as decodes would:
# each query is a "decode" of its own length, so they take the decode kernel instead of a gathered SDPA.
SHORT_QUERY = 8


class PagedAttention:
    """CPU (and reference) backend: decodes (and the rows of short queries, such as drafts being verified)
    batched into one call, prefill chunks one SDPA call each.

    Decodes use the compiled CPU kernel when it is available (a float32, bfloat16, int8 or int4 cache on CPU),
    else gathered (and dequantized) blocks and SDPA; `use_compiled=False` forces the latter.
    """

    def __init__(self, cache: PagedKVCache, use_compiled: bool = True):
        self.cache = cache
        self.device = cache.k[0].device
        kernel_dtype = self.device.type == "cpu" and (
            cache.kv_bits is not None or cache.k[0].dtype in KERNEL_DTYPES
        )
        self.use_compiled = use_compiled and kernel_dtype and cpu_kernel_available()
        self.slot_mapping = torch.zeros(0, dtype=torch.long)
        self.decode_blocks: list[list[int]] = []
        self.decode_lens: list[int] = []
        self.prefills: list[PrefillChunk] = []
        self._decode_views: dict[int | None, tuple] = {}  # per window: what the decode kernel takes

    def prepare(self, layout: StepLayout) -> None:
        """Lay out a step: single-query requests are batched decodes, the rest one chunk each."""
        self.slot_mapping = layout.slot_mapping
        self._decode_views = {}
        d = layout.num_decodes
        self.decode_blocks, self.decode_lens = list(layout.block_tables[:d]), list(layout.seq_lens[:d])
        self.prefills = []
        self.short_rows: list[int] = []  # step rows of short queries, attended as decodes after the first d
        starts = layout.query_start_loc
        for r in range(d, layout.num_requests):
            if starts[r + 1] - starts[r] <= SHORT_QUERY and layout.num_computed[r] > 0:
                for j, row in enumerate(range(starts[r], starts[r + 1])):
                    self.short_rows.append(row)
                    self.decode_blocks.append(layout.block_tables[r])
                    self.decode_lens.append(layout.num_computed[r] + j + 1)
                continue
            end_pos = layout.seq_lens[r]
            blocks = layout.block_tables[r][: -(-end_pos // self.cache.block_size)]
            block_ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
            self.prefills.append(PrefillChunk(starts[r], starts[r + 1], layout.num_computed[r], block_ids))
        self.num_decodes = d
        self._short_index = torch.tensor(self.short_rows, dtype=torch.long, device=self.device)

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        window: int | None,
        scale: float,
        quant: dict,
    ) -> torch.Tensor:
        if window not in self._decode_views:
            self._decode_views[window] = (
                self._compiled_view(window) if self.use_compiled else self._sdpa_view(window)
            )
        view = self._decode_views[window]
        if self.use_compiled:
            return paged_decode_attention_cpu(q, k_cache, v_cache, *view, scale, **quant)
        return paged_decode_attention(q, k_cache, v_cache, *view, scale, **quant)

    def _compiled_view(self, window: int | None) -> tuple:
        """Full block tables, key counts and first visible keys of the decodes, and the threads' rows."""
        lo = [0 if window is None else max(0, n - window) for n in self.decode_lens]
        width = max(len(b) for b in self.decode_blocks)
        tables = torch.tensor([b + [0] * (width - len(b)) for b in self.decode_blocks], dtype=torch.long)
        splits = split_rows(self.decode_lens, lo, torch.get_num_threads())
        return tables, torch.tensor(self.decode_lens), torch.tensor(lo), splits

    def _sdpa_view(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block tables [B, blocks] and key mask of the decodes, keeping only blocks inside the window."""
        bs = self.cache.block_size
        firsts = [0 if window is None else max(0, n - window) // bs for n in self.decode_lens]
        spans = zip(self.decode_blocks, firsts, self.decode_lens, strict=True)
        rows = [blocks[f : -(-n // bs)] for blocks, f, n in spans]
        width = max(len(r) for r in rows)
        pad = self.cache.scratch_block
        tables = torch.tensor(
            [r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=self.device
        )
        full = window is None and all(n == width * bs for n in self.decode_lens)
        mask = None
        if not full:
            lens = torch.tensor(self.decode_lens, device=self.device)
            first_pos = torch.tensor(firsts, device=self.device) * bs
            mask = decode_key_mask(lens, first_pos, width * bs, window)
        return tables, mask

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        q, k, v = q[0], k[0], v[0]  # [T, heads, D]: the engine runs one flattened sequence
        k, v = self.cache.write(layer_idx, k, v, self.slot_mapping)  # as the cache holds them
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        quant = self.cache.quantized_args(layer_idx)
        d = self.num_decodes
        if self.short_rows:  # decodes, then short queries row by row; prefill chunks written in place
            out = torch.empty_like(q)
            rows = (
                torch.cat([q[:d], q.index_select(0, self._short_index)])
                if d
                else q.index_select(0, self._short_index)
            )
            attended = self._decode(rows, k_cache, v_cache, window, scale, quant)
            out[:d] = attended[:d]
            out.index_copy_(0, self._short_index, attended[d:])
            for chunk in self.prefills:
                out[chunk.start : chunk.end] = self._prefill(
                    chunk, q, k, v, k_cache, v_cache, window, scale, quant
                )
            return out[None]
        parts = []
        if d:
            parts.append(self._decode(q[:d], k_cache, v_cache, window, scale, quant))
        for chunk in self.prefills:
            parts.append(self._prefill(chunk, q, k, v, k_cache, v_cache, window, scale, quant))
        return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]

    def _prefill(self, chunk, q, k, v, k_cache, v_cache, window, scale, quant) -> torch.Tensor:
        """One multi-token chunk's attention [chunk queries, H, D]."""
        qc = q[chunk.start : chunk.end]
        if chunk.num_computed == 0:  # nothing cached before the chunk: its own keys are all there is
            return sdpa_attention(
                qc[None],
                k[None, chunk.start : chunk.end],
                v[None, chunk.start : chunk.end],
                scale=scale,
                window=window,
            )[0]
        return paged_prefill_attention(
            qc, k_cache, v_cache, chunk.block_ids, chunk.num_computed, window, scale, **quant
        )


class TritonPagedAttention:
    """CUDA backend: one Triton launch per layer for the whole step, decodes and prefill chunks alike.

    Its inputs are tensors of fixed shape for a given number of tokens, so a pure-decode step can be
    captured in a CUDA graph; `bind` points the backend at the graph's static buffers.
    """

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.device = cache.k[0].device
        self.slot_mapping = self.block_tables = self.seq_ids = self.positions = None

    def bind(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Use these device tensors as the step's layout (block_tables, seq_ids, positions int32)."""
        self.slot_mapping, self.block_tables, self.seq_ids, self.positions = (
            slot_mapping,
            block_tables,
            seq_ids,
            positions,
        )

    def prepare(self, layout: StepLayout) -> None:
        width = max(len(b) for b in layout.block_tables)
        pad = self.cache.scratch_block
        tables = [b + [pad] * (width - len(b)) for b in layout.block_tables]
        seq_ids = [r for r, n in enumerate(layout.query_lens()) for _ in range(n)]
        as_int32 = dict(dtype=torch.int32, device=self.device)
        self.bind(
            layout.slot_mapping,
            torch.tensor(tables, **as_int32),
            torch.tensor(seq_ids, **as_int32),
            layout.positions.to(torch.int32),
        )

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        self.cache.write(layer_idx, k[0], v[0], self.slot_mapping)
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        out = paged_attention_triton(
            q[0].contiguous(),
            k_cache,
            v_cache,
            self.block_tables,
            self.seq_ids,
            self.positions,
            window,
            scale,
            **self.cache.quantized_args(layer_idx),
        )
        return out[None]


# name -> backend class; "auto" picks triton on CUDA (when Triton is installed), paged elsewhere.
BACKENDS: dict[str, type] = {"paged": PagedAttention, "triton": TritonPagedAttention}


def _triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under its interpreter (TRITON_INTERPRET=1: how CI tests the kernel)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return paged_attention.triton is not None and (device.type == "cuda" or interpreted)


def backend_name(name: str, device: torch.device) -> str:
    """The backend `name` stands for on `device` ("auto" resolved); ConfigError for unknown names."""
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device) else "paged"
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    if name == "triton" and not _triton_usable(device):
        raise ConfigError(
            "the triton attention backend needs CUDA and Triton (or TRITON_INTERPRET=1); use --attention-backend paged"
        )
    return name


def make_backend(name: str, cache: PagedKVCache):
    """The attention backend `name` over `cache`."""
    return BACKENDS[backend_name(name, cache.device)](cache)
