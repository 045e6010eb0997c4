"""`LLM`: the offline API. Submit every prompt at once and let the engine batch them.

llm = LLM("HuggingFaceTB/SmolLM2-135M", max_num_seqs=32)
outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=64))
print(outs[0].text)
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from effllm.core.errors import InputError
from effllm.engine.embeddings import embed
from effllm.engine.llm_engine import PromptType, make_engine
from effllm.engine.outputs import RequestOutput
from effllm.engine.sampling_params import SamplingParams
from effllm.models.transformer import CausalLM


class LLM:
    """An engine over `model`: a checkpoint folder or hub id, or a loaded `CausalLM` (with `tokenizer`,
    a Tokenizer or folder, for text prompts). `engine_options` are `EngineConfig` fields. It runs batches to
    completion, so on CPU its default token budget is the offline one (`CPU_OFFLINE_MAX_NUM_BATCHED_TOKENS`)."""

    def __init__(self, model: CausalLM | str | os.PathLike, tokenizer: Any = None, **engine_options: Any):
        self.engine = make_engine(model, tokenizer, offline=True, **engine_options)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs of every prompt, in the order given; one SamplingParams for all or one per prompt."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InputError(
                f"prompts must be a string, token ids, a dict or a list of them, not {type(prompts).__name__}"
            )
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InputError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each"
                )
        with self._lock:  # one engine, one batch: calls from several threads take turns
            ids = [str(next(self._ids)) for _ in prompts]
            try:
                for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                    self.engine.add_request(request_id, prompt, p)
                return self._run(ids, use_tqdm)
            finally:  # on any error (a bad prompt, a failed step, Ctrl-C) none of this call's requests stays queued
                self.engine.abort(ids)

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling: str = "mean") -> torch.Tensor:
        """Unit vectors [len(prompts), hidden]: each prompt's final hidden states pooled (`mean` or `last`
        token; `effllm.engine.embeddings`)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.engine.tokenize(p)[1] for p in prompts]
        with self._lock:
            return embed(self.engine.model, ids, pooling)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
