"""`ModelRunner`: runs one scheduled step as a single forward over the paged KV cache, then samples.

The step's tokens (decodes first, then prefill chunks) are flattened into one sequence of length T:
input ids, positions and the flat cache slot of each token. The attention backend keeps sequences
apart. Logits are computed only at the last token of requests whose every token is now computed (a
decode, or the chunk that finishes a prompt); a chunk in the middle of a prompt samples nothing.
"""

from __future__ import annotations

import logging

import torch

from effllm.engine.attention_backend import PagedAttention, TritonPagedAttention
from effllm.engine.config import EngineConfig
from effllm.engine.cuda_graphs import DecodeGraphs
from effllm.engine.kv_cache import PagedKVCache, num_kv_blocks
from effllm.engine.request import Request
from effllm.engine.sampler import Sampler
from effllm.engine.scheduler import SchedulerOutput
from effllm.kernels import paged_attention
from effllm.models.transformer import CausalLM

log = logging.getLogger(__name__)

SampledTokens = dict[Request, tuple[int, dict[int, float] | None]]


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig):
        self.model = model
        self.config = config
        self.device = model.device
        self.block_size = config.block_size
        activation_bytes = 0
        on_cuda = self.device.type == "cuda"
        if on_cuda and config.kv_cache_memory is None and config.num_kv_blocks is None:
            activation_bytes = self._profile_activations()
        self.num_blocks = num_kv_blocks(config, model.config, model.dtype, self.device, activation_bytes)
        self.cache = PagedKVCache(model.config, self.num_blocks, self.block_size, model.dtype, self.device)
        use_triton = on_cuda and paged_attention.triton is not None
        self.backend = TritonPagedAttention(self.cache) if use_triton else PagedAttention(self.cache)
        self.sampler = Sampler(self.device, config.seed)
        self.graphs: DecodeGraphs | None = None
        if use_triton and not config.enforce_eager:
            self.graphs = self._capture_graphs()

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak memory of the largest step (dense attention stands in for the paged one)."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.config.max_num_batched_tokens
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(ids)
        self.model.logits(hidden[0, : self.config.max_num_seqs])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del hidden
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _capture_graphs(self) -> DecodeGraphs | None:
        if self.model.config.rope_type == "dynamic":  # its cos/sin depend on a host-side max position
            return None
        max_blocks = -(-self.config.max_model_len // self.block_size)
        try:
            return DecodeGraphs(self.model, self.backend, self.config.max_num_seqs, max_blocks)
        except RuntimeError as e:  # capture is an optimisation: fall back to eager decoding
            log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
            return None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """Run the step; returns the sampled token (and logprobs) of each request that samples."""
        hidden, sample_rows, sampling = self.forward(out)
        if not sampling:
            return {}
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, dtype=torch.long, device=self.device)]
        logits = self.model.logits(hidden)
        return dict(zip(sampling, self.sampler(logits, sampling), strict=True))

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[int], list[Request]]:
        """Hidden states [T, hidden] of the step's flattened tokens, the rows that sample, and their requests."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Request] = []
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            ids += request.token_ids[start:end]
            positions += range(start, end)
            blocks = request.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            if end == request.num_tokens:
                sample_rows.append(len(ids) - 1)
                sampling.append(request)
        as_long = dict(dtype=torch.long, device=self.device)
        ids_t, positions_t, slots_t = (torch.tensor(x, **as_long) for x in (ids, positions, slots))
        all_decodes = len(ids) == len(out.requests)
        if self.graphs is not None and all_decodes and len(ids) <= self.graphs.max_batch:
            hidden = self.graphs.run(ids_t, positions_t, slots_t, [r.block_ids for r in out.requests])
        else:
            self.backend.prepare(out.requests, out.num_tokens, slots_t)
            hidden = self.model.hidden_states(ids_t[None], positions_t[None], attn=self.backend)[0]
        return hidden, sample_rows, sampling
