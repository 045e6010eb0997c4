"""Embeddings from a causal LM: its final (normed) hidden states pooled over a text's tokens.

`mean` averages every token's state (the default of `/v1/embeddings`); `last` takes the last token's,
which has read the whole text (what decoder-only embedding models such as E5-Mistral train for). Vectors
are L2-normalised, as OpenAI's are, so a dot product is the cosine similarity. A base language model
was not trained for this: expect topical similarity, not a tuned embedding model's quality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effllm.core.errors import InputError
from effllm.models.transformer import CausalLM

POOLINGS = ("mean", "last")


@torch.inference_mode()
def embed(model: CausalLM, prompts: list[list[int]], pooling: str = "mean") -> torch.Tensor:
    """float32 [len(prompts), hidden], one unit vector per prompt (token ids)."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    vectors = []
    for ids in prompts:
        if not ids:
            raise InputError("cannot embed an empty input; give at least one token")
        hidden = model.hidden_states(torch.tensor([ids], device=model.device))[0].float()  # [T, hidden]
        vectors.append(hidden.mean(0) if pooling == "mean" else hidden[-1])
    return F.normalize(torch.stack(vectors), dim=-1).cpu()
