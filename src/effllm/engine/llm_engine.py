"""`LLMEngine`: requests in, one step at a time, `RequestOutput`s out.

    engine = LLMEngine.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    engine.add_request("a", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():           # requests that advanced this step
            print(out.request_id, out.outputs[0].delta_text, out.finished)

Each step schedules (Scheduler), runs one forward and samples (ModelRunner), appends the tokens and
stops what should stop (Scheduler.update), then detokenizes and matches stop strings (OutputProcessor).
The engine is synchronous and single-threaded; an async server drives `step` from one loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from effllm.core.dtypes import parse_device, parse_dtype
from effllm.core.errors import ConfigError, EffLLMError, InputError
from effllm.engine.block_manager import BlockManager
from effllm.engine.config import EngineConfig, engine_config
from effllm.engine.logit_difference import LogitDifference
from effllm.engine.model_runner import ModelRunner
from effllm.engine.output_processor import OutputProcessor, ParentRequest
from effllm.engine.outputs import RequestOutput
from effllm.engine.request import Request
from effllm.engine.sampling_params import SamplingParams
from effllm.engine.scheduler import Scheduler, SchedulerOutput
from effllm.engine.spec_decode.gate import SpeculationGate
from effllm.engine.spec_decode.proposer import Proposer, propose_drafts
from effllm.engine.spec_decode.registry import make_proposer
from effllm.engine.structured.manager import StructuredOutputManager
from effllm.models.checkpoint import load_model
from effllm.models.hub import resolve_model_path
from effllm.models.multi_lora import load_adapters
from effllm.models.soft_prompt import load_soft_prompt_into
from effllm.models.tokenizer import load_tokenizer
from effllm.models.transformer import CausalLM

PromptType = str | list[int] | dict[str, Any]


class StepError(EffLLMError):
    """A step failed; its requests (`request_ids`) were aborted and the engine is usable again."""

    http_status = 500

    def __init__(self, request_ids: list[str], cause: BaseException):
        self.request_ids = request_ids
        self.cause = cause
        super().__init__(
            f"the engine failed while running request(s) {', '.join(request_ids)} "
            f"({type(cause).__name__}: {cause}); they were aborted, the engine goes on"
        )


@dataclass
class EngineStats:
    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prefill chunks, decodes, recomputes)
    num_prefix_cache_hit_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    num_preemptions: int = 0
    max_num_running: int = 0  # most requests scheduled in one step (what the KV cache let run at once)
    num_draft_tokens: int = 0  # speculative decoding: drafts verified
    num_accepted_tokens: int = (
        0  # drafts the target agreed with (accepted length = accepted / verifications + 1)
    )
    num_verifications: int = 0  # request-steps that verified at least one draft

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per request-step that verified drafts (1 = no draft ever accepted)."""
        return 1 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        config: EngineConfig | None = None,
        proposer: Proposer | None = None,
        offline: bool = False,
    ):
        config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config.resolve(model.config.max_position_embeddings, model.device, offline)
        # A soft prompt and LoRA adapters go into the model before the runner fuses, compiles or captures.
        self.virtual_ids = load_soft_prompt_into(model, config.soft_prompt) if config.soft_prompt else []
        self.adapters = {name: i for i, name in enumerate(load_adapters(model, self.config.lora_adapters()))}
        self.runner = ModelRunner(model, self.config)
        # A request may use the model's context, but never more than the whole cache holds.
        cache_tokens = self.runner.num_blocks * self.config.block_size
        if cache_tokens < self.config.max_model_len:
            self.config.max_model_len = cache_tokens
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            self.config.block_size,
            self.config.enable_prefix_caching,
            cache_outputs=self.config.skip_decode is None,
        )
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.output_processor = OutputProcessor(tokenizer)
        self.parents: dict[str, ParentRequest] = {}
        self._parent_of: dict[Request, ParentRequest] = {}
        eos = list(model.config.eos_token_ids) + list(getattr(tokenizer, "eos_token_ids", None) or [])
        self.eos_token_ids = frozenset(eos)
        self.structured = StructuredOutputManager(
            tokenizer,
            model.config.vocab_size,
            sorted(self.eos_token_ids),
            self.config.structured_outputs_backend,
        )
        self.runner.structured = self.structured
        self.uld = None
        if self.config.uld_assistant:
            self.uld = LogitDifference.load(
                self.config.uld_assistant, model, self.config, self.runner.num_blocks
            )
            self.runner.logits_combiner = self.uld
        self.stats = EngineStats()
        self.proposer = proposer or make_proposer(self.config, self.runner, self.block_manager)
        self.gate = SpeculationGate() if self.config.speculative_adaptive else None

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, tokenizer: Any = None, offline: bool = False, **options: Any
    ) -> LLMEngine:
        """Load a checkpoint (folder or hub id) and its tokenizer (when the folder has one); `offline` as in
        `EngineConfig.resolve`."""
        config = engine_config(options)
        model = load_model(path_or_id, dtype=config.dtype, device=config.device)
        if tokenizer is None and (resolve_model_path(path_or_id) / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(path_or_id)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        return cls(model, tokenizer, config, offline=offline)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a prompt: text, token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        params = params or SamplingParams()
        if request_id in self.parents:
            raise InputError(f"request id {request_id!r} is already in use; give each request its own id")
        text, ids = self.tokenize(prompt)
        self._validate(ids, params)
        if params.structured is not None:
            self.structured.compile(
                params.structured
            )  # a spec that cannot compile fails here, queueing nothing
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentRequest(request_id, text, ids, params, arrival_time)
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            request = Request(
                request_id if params.n == 1 else f"{request_id}-{i}",
                self.virtual_ids + ids,
                params,
                self.eos_token_ids,
                seed,
                arrival_time,
            )
            request.num_virtual_tokens = len(self.virtual_ids)
            if params.adapter is not None:
                request.adapter_index, request.cache_salt = self.adapters[params.adapter], params.adapter
            if params.structured is not None:
                request.grammar = self.structured.grammar_for(params.structured)
            if i and self.config.enable_prefix_caching:
                request.wait_for = parent.samples[0].request  # then share its prompt blocks
            parent.samples.append(self.output_processor.new_sample(request))
            self._parent_of[request] = parent
        for sample in parent.samples:
            self.scheduler.add(sample.request)
        self.parents[request_id] = parent

    def abort(self, request_ids: str | list[str]) -> None:
        """Stop requests now and free their blocks; unknown or finished ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.pop(request_id, None)
            for sample in parent.samples if parent else []:
                self.scheduler.finish(sample.request, "abort")
                del self._parent_of[sample.request]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that produced tokens or finished.

        If the step fails (an exception in the forward, the sampler or the detokenizer), the requests it
        held are aborted, their blocks freed, and `StepError` names them; the engine stays usable.
        """
        start = time.perf_counter()
        running = self.scheduler.running
        num_running = len(running)
        if self.uld is not None:
            self.uld.retain(running)
        if self.proposer is not None:
            self.proposer.retain(running)
            wanted = num_running <= self.config.speculative_max_running
            if wanted and (self.gate is None or self.gate.should_draft(num_running)):
                k = self.config.num_speculative_tokens
                propose_drafts(self.proposer, running, self.config.max_model_len, k)
        out = self.scheduler.schedule()
        self.stats.num_preemptions += len(out.preempted)
        if not out:
            if self.scheduler.has_unfinished() and not out.preempted:
                raise RuntimeError("the scheduler found nothing to run while requests wait; this is a bug")
            return []
        # Decode-only steps (every request computes its last token, with or without drafts) teach the gate.
        decode_only = all(
            r.samples_after(n) and n == len(r.draft_token_ids) + 1
            for r, n in zip(out.requests, out.num_tokens, strict=True)
        )
        drafted = any(r.draft_token_ids for r in out.requests)
        try:
            outputs = self._run_step(out)
            if self.gate is not None and self.proposer is not None and decode_only:
                self.gate.record(num_running, drafted, self._step_tokens, time.perf_counter() - start)
            return outputs
        except Exception as e:
            failed = list(
                dict.fromkeys(self._parent_of[r].request_id for r in out.requests if r in self._parent_of)
            )
            self.abort(failed)
            raise StepError(failed, e) from e

    def _run_step(self, out: SchedulerOutput) -> list[RequestOutput]:
        sampled = self.runner.execute(out)
        self._step_tokens = sum(len(tokens) for tokens in sampled.values())
        for request, tokens in sampled.items():
            if request.draft_token_ids:
                self.stats.num_draft_tokens += len(request.draft_token_ids)
                self.stats.num_accepted_tokens += len(tokens) - 1
                self.stats.num_verifications += 1
        self.scheduler.update(out, sampled)
        self.stats.num_steps += 1
        self.stats.max_num_running = max(self.stats.max_num_running, len(out.requests))
        self.stats.num_computed_tokens += out.total_tokens
        self.stats.num_prefix_cache_hit_tokens = self.scheduler.num_prefix_hit_tokens
        touched: dict[str, ParentRequest] = {}
        for request in sampled:
            parent = self._parent_of[request]
            touched[parent.request_id] = parent
            sample = next(s for s in parent.samples if s.request is request)
            stop = self.output_processor.add_tokens(sample)
            if stop is not None:
                if request.is_finished:  # ended by EOS or length in the same token: the stop string wins
                    request.finish_reason, request.stop_reason = "stop", stop
                else:
                    self.scheduler.finish(request, "stop", stop)
        outputs = []
        for parent in touched.values():
            outputs.append(self.output_processor.make_output(parent))
            if parent.finished:
                del self.parents[parent.request_id]
                for sample in parent.samples:
                    del self._parent_of[sample.request]
        return outputs

    # ------------------------------------------------------------------ input checks
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt in any accepted form."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise InputError(
                        f"prompt_token_ids must be a list of token ids, not {type(ids).__name__}"
                    )
                return prompt.get("prompt"), list(ids)
            if "prompt" not in prompt:
                raise InputError("a prompt dict needs 'prompt_token_ids' or 'prompt'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(
                    "this engine has no tokenizer; pass {'prompt_token_ids': [...]} instead of text"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InputError(f"a prompt is a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InputError("the prompt is empty; give at least one token")
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise InputError(f"prompt token ids must be integers, got {bad!r}")
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling params must be a SamplingParams, not {type(params).__name__}")
        vocab = self.model.config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise InputError(f"{name} {k} exceeds the vocabulary ({vocab} tokens); ask for fewer")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        limit = self.config.max_model_len - len(self.virtual_ids)
        if len(ids) >= limit:
            soft = f", after the soft prompt's {len(self.virtual_ids)}" if self.virtual_ids else ""
            raise InputError(
                f"the prompt has {len(ids)} tokens but a request may hold at most {limit} (prompt and output "
                f"together, max_model_len or what the KV cache holds{soft}); shorten the prompt"
            )
        if self.virtual_ids and params.prompt_logprobs is not None:
            raise InputError("prompt_logprobs are not available with a soft prompt; leave them out")
        if params.adapter is not None and params.adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none (load them with lora=[NAME=PATH])"
            raise InputError(f"no LoRA adapter named {params.adapter!r}; this engine has {known}")
        if self.config.uld_assistant and params.prompt_logprobs is not None:
            raise InputError("prompt_logprobs are not available with a ULD assistant; leave them out")
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer; use stop_token_ids, or load the model with one")


def make_engine(
    model: CausalLM | str | os.PathLike, tokenizer: Any = None, offline: bool = False, **options: Any
) -> LLMEngine:
    """An engine over an already loaded model (moved to options' dtype and device) or a checkpoint; `offline`
    as in `EngineConfig.resolve`."""
    if not isinstance(model, CausalLM):
        return LLMEngine.from_pretrained(model, tokenizer, offline, **options)
    config = engine_config(options)
    if config.device is not None or config.dtype is not None:
        device = parse_device(config.device) if config.device is not None else model.device
        model = model.to(device=device, dtype=parse_dtype(config.dtype) or model.dtype)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is not None and not hasattr(tokenizer, "encode"):
        raise ConfigError(f"tokenizer must be a Tokenizer or a folder, not {type(tokenizer).__name__}")
    return LLMEngine(model, tokenizer, config, offline=offline)
