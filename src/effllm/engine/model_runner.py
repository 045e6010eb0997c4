"""`ModelRunner`: runs one scheduled step as a single forward over the paged KV cache, then samples.

The step's tokens (decodes first, then multi-token chunks) are flattened into one sequence of length T
and described by a `StepLayout` (input ids, positions, the flat cache slot of each token, block tables);
the attention backend reads only that and keeps sequences apart. Logits are computed only at the last
token of requests whose every token is now computed (a decode, or the chunk that finishes a prompt), and
at each draft token of a request verifying drafts; a chunk in the middle of a prompt samples nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from effllm.core import huge_pages
from effllm.core.errors import ConfigError
from effllm.engine.attention_backend import PagedAttention, TritonPagedAttention, make_backend
from effllm.engine.config import EngineConfig
from effllm.engine.cpu_decode_step import CPUDecodeStep
from effllm.engine.cuda_graphs import DecodeGraphs
from effllm.engine.kv_cache import PagedKVCache, num_kv_blocks, resolve_kv_bits
from effllm.engine.request import Request
from effllm.engine.sampler import Sampler
from effllm.engine.scheduler import SchedulerOutput
from effllm.engine.skip_decode import SkipSchedule
from effllm.engine.spec_decode.verify import accept_greedy
from effllm.engine.step_layout import StepLayout, build_step_layout
from effllm.engine.structured.manager import StructuredOutputManager
from effllm.models.decode_linear import prepack_bf16, use_decode_linears
from effllm.models.fused_projections import fuse_projections
from effllm.models.multi_lora import adapter_rows
from effllm.models.sparse_linear import sparsify_linears_
from effllm.models.transformer import CausalLM

log = logging.getLogger(__name__)

# Per request that sampled: the tokens it accepted this step, each with its logprobs (or None).
SampledTokens = dict[Request, list[tuple[int, dict[int, float] | None]]]


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig):
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model = model
        self.config = config
        self.device = model.device
        self.block_size = config.block_size
        activation_bytes = 0
        on_cuda = self.device.type == "cuda"
        if on_cuda and config.kv_cache_memory is None and config.num_kv_blocks is None:
            activation_bytes = self._profile_activations()
        kv_bits = resolve_kv_bits(config.kv_cache_dtype, model.config)
        self.num_blocks = num_kv_blocks(
            config, model.config, model.dtype, self.device, activation_bytes, kv_bits
        )
        cpu_huge = self.device.type == "cpu" and config.cpu_huge_pages
        self.cache = PagedKVCache(
            model.config, self.num_blocks, self.block_size, model.dtype, self.device, kv_bits, cpu_huge
        )
        self.backend = make_backend(config.attention_backend, self.cache)
        if config.sparse_linears is not None:
            if self.device.type != "cpu":
                raise ConfigError("--sparse-linears runs MKL's CSR products on CPU; leave it off on CUDA")
            sparsify_linears_(model, config.sparse_linears)  # before the GEMV swap, which takes nn.Linear
        if self.device.type == "cpu" and config.cpu_gemv:
            use_decode_linears(model)
            fuse_projections(model)
            if config.cpu_prepack:
                prepack_bf16(model)
        self.fused_decode = None
        # LoRA adapters chosen per request: the module forwards add them, so no fused step or captured graph.
        self.has_adapters = getattr(model, "adapter_context", None) is not None
        # The fused step does its own attention: only where the CPU's paged backend would run it anyway.
        paged = type(self.backend) is PagedAttention
        fused = config.cpu_fused_decode and not self.has_adapters
        if self.device.type == "cpu" and config.cpu_gemv and fused and paged:
            self.fused_decode = CPUDecodeStep.build(model, self.cache, config.cpu_fused_decode)
        if cpu_huge:  # after fusing, whose concatenated weights are new memory
            start = time.perf_counter()
            moved = huge_pages.collapse(model.state_dict(keep_vars=True).values())
            if moved:
                log.info(
                    "weights: %.0f MiB moved onto huge pages in %.1f s (--no-cpu-huge-pages to skip)",
                    moved / 2**20,
                    time.perf_counter() - start,
                )
        self.sampler = Sampler(self.device, config.seed)
        self.structured: StructuredOutputManager | None = None  # set by the engine: masks constrained rows
        # Set by the engine: (logits [R, V], the R sampling requests) -> combined logits (ULD's assistant).
        self.logits_combiner = None
        self.skip_schedule = (
            SkipSchedule.parse(config.skip_decode, model.config.num_hidden_layers)
            if config.skip_decode
            else None
        )
        self.graphs: DecodeGraphs | None = None
        # The captured graph runs every layer of every row, without adapters.
        graphs_fit = self.skip_schedule is None and not self.has_adapters
        if (
            isinstance(self.backend, TritonPagedAttention)
            and on_cuda
            and not config.enforce_eager
            and graphs_fit
        ):
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
        """Run the step; returns, per request that samples, the tokens it accepts (with logprobs): one
        sampled token, or for a request verifying drafts the accepted drafts and the target's next token."""
        layout = self.layout(out)
        depths = self._depths(out)
        with self._adapter_rows(out, layout):
            if depths is None:
                hidden = self.forward(layout)
            else:
                hidden = self.model.model.norm(self.forward_layers(layout, *depths))
        self._score_prompts(out, layout, hidden)
        if not layout.sample_rows:
            return {}
        if len(layout.sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(layout.sample_rows, dtype=torch.long, device=self.device)]
        rows = [r for r, n in zip(out.requests, out.num_tokens, strict=True) if r.samples_after(n)]
        logits = self.model.logits(hidden)
        if self.logits_combiner is not None:
            logits = self.logits_combiner(logits, rows)
        if self.structured is not None:
            logits = self.structured.mask_logits(logits, rows)
        # Sampling requests with drafts are verified by rejection sampling on their own rows; every other row
        # (greedy drafts included, checked by accept_greedy) goes through the sampler in one batch.
        spans, start = {}, 0
        for request in rows:
            spans[request] = (start, start + len(request.draft_token_ids) + 1)
            start = spans[request][1]
        rejection = [r for r in rows if r.draft_token_ids and r.params.temperature > 0]
        plain = [r for r in rows if r not in rejection] if rejection else rows
        index = [i for r in plain for i in range(*spans[r])]
        plain_logits = logits
        if len(index) < logits.shape[0]:
            plain_logits = logits[torch.tensor(index, dtype=torch.long, device=self.device)]
        row_requests = [r for r in plain for _ in range(len(r.draft_token_ids) + 1)]
        drawn = iter(self.sampler(plain_logits, row_requests) if plain else [])
        result: SampledTokens = {}
        for request in rows:
            if request in rejection:
                result[request] = self.sampler.verify(logits[slice(*spans[request])], request)
                continue
            sampled = [next(drawn) for _ in range(len(request.draft_token_ids) + 1)]
            result[request] = accept_greedy(request.draft_token_ids, sampled)
        return result

    def _score_prompts(self, out: SchedulerOutput, layout: StepLayout, hidden: torch.Tensor) -> None:
        """Prompt logprobs: the row at position p scores prompt token p + 1 (raw logits, as the sampler's)."""
        for r, (request, n) in enumerate(zip(out.requests, out.num_tokens, strict=True)):
            k = request.params.prompt_logprobs
            start = request.num_computed_tokens
            end = min(start + n, request.num_prompt_tokens - 1)  # positions whose next token is in the prompt
            if k is None or end <= start:
                continue
            row = layout.query_start_loc[r]
            logp = self.model.logits(hidden[row : row + end - start]).float().log_softmax(dim=-1)
            targets = torch.tensor(request.token_ids[start + 1 : end + 1], device=logp.device)
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            top = logp.topk(k, dim=-1) if k else None
            for i, (token, value) in enumerate(zip(targets.tolist(), chosen, strict=True)):
                entry = {}
                if top is not None:
                    entry.update(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
                entry[token] = value
                request.prompt_logprobs[start + 1 + i] = entry

    def _adapter_rows(self, out: SchedulerOutput, layout: StepLayout) -> Any:
        """Within it, each request's rows of the step get its LoRA adapter (when adapters are loaded)."""
        if not self.has_adapters:
            return contextlib.nullcontext()
        rows: dict[int, list[int]] = {}
        for i, request in enumerate(out.requests):
            if request.adapter_index is not None:
                start, end = layout.query_start_loc[i], layout.query_start_loc[i + 1]
                rows.setdefault(request.adapter_index, []).extend(range(start, end))
        groups = {a: torch.tensor(r, dtype=torch.long, device=self.device) for a, r in rows.items()}
        return adapter_rows(self.model, groups)

    def layout(self, out: SchedulerOutput) -> StepLayout:
        """The step's `StepLayout`: each request's uncomputed tokens (and drafts), its blocks, its sample rows."""
        tokens, samples = [], []
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            start = request.num_computed_tokens
            tokens.append((request.token_ids + request.draft_token_ids)[start : start + n])
            samples.append(len(request.draft_token_ids) + 1 if request.samples_after(n) else 0)
        return build_step_layout(
            tokens,
            [r.num_computed_tokens for r in out.requests],
            [r.block_ids for r in out.requests],
            samples,
            self.block_size,
            self.device,
        )

    def _depths(self, out: SchedulerOutput) -> tuple[list[int], list[int], dict[int, torch.Tensor]] | None:
        """Per request, the first and one-past-last decoder layer this step runs, and the input hidden
        states of requests that start above layer 0; None when every request runs the whole model.

        Requests verifying an early-exit proposer's drafts start at its exit layer (the layers below were
        computed while drafting); with SkipDecode, decodes of generated tokens stop at the schedule's exit.
        """
        num_layers = self.model.config.num_hidden_layers
        starts, ends, hidden = [0] * len(out.requests), [num_layers] * len(out.requests), {}
        for i, (request, n) in enumerate(zip(out.requests, out.num_tokens, strict=True)):
            drafted = request.draft_hidden
            if drafted is not None and request.samples_after(n) and n == len(request.draft_token_ids) + 1:
                starts[i] = drafted.start_layer
                hidden[i] = drafted.hidden[:n]
            elif (
                self.skip_schedule is not None
                and n == 1
                and request.num_computed_tokens >= request.num_prompt_tokens
            ):
                generated = request.num_computed_tokens - request.num_prompt_tokens
                ends[i] = self.skip_schedule.exit_layer(generated)
        if not hidden and all(e == num_layers for e in ends):
            return None
        return starts, ends, hidden

    @torch.inference_mode()
    def forward_layers(
        self,
        layout: StepLayout,
        starts: list[int],
        ends: list[int],
        hidden: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] before the final norm when request r runs only layers
        starts[r] .. ends[r] - 1, from `hidden[r]` (its rows' input of layer starts[r]) when starts[r] > 0.

        Layers are run in spans over which the set of requests running them stays the same; a span that
        not every request runs attends with a layout of only those requests, so skipped layers neither
        read nor write the KV cache of the others."""
        stack = self.model.model
        x = stack.embed(layout.input_ids)
        for r, h in (hidden or {}).items():
            start = layout.query_start_loc[r]
            x[start : start + h.shape[0]] = h.to(x.dtype)
        bounds = sorted({0, self.model.config.num_hidden_layers, *starts, *ends})
        everyone = list(range(layout.num_requests))
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            active = [r for r in everyone if starts[r] <= lo and hi <= ends[r]]
            if not active:
                continue
            if len(active) == len(everyone):
                self.backend.prepare(layout)
                x = stack.run_layers(x[None], layout.positions[None], self.backend, lo, hi)[0]
                continue
            part = layout.select(active)
            rows = torch.tensor(layout.rows_of(active), dtype=torch.long, device=self.device)
            self.backend.prepare(part)
            h = stack.run_layers(x[rows][None], part.positions[None], self.backend, lo, hi)[0]
            x = x.index_copy(0, rows, h)
        return x

    @torch.inference_mode()
    def forward(self, layout: StepLayout) -> torch.Tensor:
        """Hidden states [T, hidden] of the step's flattened tokens."""
        if self.graphs is not None and layout.all_decodes and layout.num_tokens <= self.graphs.max_batch:
            return self.graphs.run(layout)
        if self.fused_decode is not None and self.fused_decode.qualifies(layout):
            hidden = self.fused_decode.run(layout)
            if hidden is not None:
                return hidden
        self.backend.prepare(layout)
        return self.model.hidden_states(layout.input_ids[None], layout.positions[None], attn=self.backend)[0]
