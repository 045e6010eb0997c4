"""CUDA graphs of pure-decode steps: one captured forward per padded batch size, sharing a memory pool.

A decode step launches a few hundred small kernels; replaying a graph launches them at once. Inputs go
through static buffers: the step's rows are copied in, padded rows point at the cache's scratch block
(their keys land there and are never read by a real sequence). Prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import torch

from effllm.engine.attention_backend import TritonPagedAttention
from effllm.engine.step_layout import StepLayout
from effllm.models.transformer import CausalLM


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, up to max_batch (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8, *range(16, max_batch + 1, 16)) if s <= max_batch]
    return sizes if sizes[-1] == max_batch else [*sizes, max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, backend: TritonPagedAttention, max_batch: int, max_blocks: int):
        device = backend.device
        cache = backend.cache
        self.block_size = cache.block_size
        self.scratch_block = cache.scratch_block
        self.sizes = graph_batch_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full(
            (max_batch,), self.scratch_block * self.block_size, dtype=torch.long, device=device
        )
        self.block_tables = torch.full(
            (max_batch, max_blocks), self.scratch_block, dtype=torch.int32, device=device
        )
        self.seq_ids = torch.arange(max_batch, dtype=torch.int32, device=device)
        self.query_positions = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.backend = backend
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            self._bind(size)

            def forward(size=size):
                return model.hidden_states(
                    self.input_ids[None, :size], self.positions[None, :size], attn=backend
                )

            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: compile kernels, settle the allocator
                forward()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = forward()
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _bind(self, size: int) -> None:
        self.backend.bind(
            self.slot_mapping[:size],
            self.block_tables[:size],
            self.seq_ids[:size],
            self.query_positions[:size],
        )

    def run(self, layout: StepLayout) -> torch.Tensor:
        """Replay the smallest graph that holds the step's n decodes; returns hidden states [n, hidden]."""
        input_ids, positions, slot_mapping = layout.input_ids, layout.positions, layout.slot_mapping
        block_tables = layout.block_tables
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        width = self.block_tables.shape[1]
        rows = [blocks[:width] + [self.scratch_block] * (width - len(blocks)) for blocks in block_tables]
        rows += [[self.scratch_block] * width] * (size - n)
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:size].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:size].zero_()
        self.query_positions[:size].copy_(self.positions[:size])
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:size].fill_(self.scratch_block * self.block_size)
        self.block_tables[:size].copy_(torch.tensor(rows, dtype=torch.int32))
        self.graphs[size].replay()
        return self.outputs[size][0, :n]
