"""`LLM`: the offline API. Submit every prompt at once and let the engine batch them.

llm = LLM("HuggingFaceTB/SmolLM2-135M", max_num_seqs=32)
outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=64))
print(outs[0].text)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from effllm.core.errors import InputError
from effllm.engine.llm_engine import PromptType, make_engine
from effllm.engine.outputs import RequestOutput
from effllm.engine.sampling_params import SamplingParams
from effllm.models.transformer import CausalLM


class LLM:
    """An engine over `model`: a checkpoint folder or hub id, or a loaded `CausalLM` (with `tokenizer`,
    a Tokenizer or folder, for text prompts). `engine_options` are `EngineConfig` fields."""

    def __init__(self, model: CausalLM | str | os.PathLike, tokenizer: Any = None, **engine_options: Any):
        self.engine = make_engine(model, tokenizer, **engine_options)
        self._ids = itertools.count()

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
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InputError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each"
                )
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
        except Exception:
            self.engine.abort(ids)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
