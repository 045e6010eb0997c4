"""Soft prompts (Compress-Then-Prompt, arXiv 2305.11186): learned embeddings before every input.

A soft prompt is n vectors of the model's hidden size. EffLLM gives them token ids past the vocabulary,
V .. V + n - 1 ("virtual tokens"): `add_soft_prompt` swaps the model's `embed_tokens` for a
`PromptEmbedding` that looks ids below V up in the embedding table as before (the same weight, so a tied
LM head stays tied) and ids from V on in the prompt. Everything downstream of the embedding is
unchanged, so a prompted forward is `model(virtual ids + input ids)`: training (`train/soft_prompt.py`)
prepends them to each sequence, the engine to each request's prompt, and the prefix cache then computes
their KV once and shares it between requests. The LM head still has V rows, so a virtual id is never
generated.

Files (`save_soft_prompt`): `soft_prompt.safetensors` (one tensor, `prompt_embeds` [n, hidden], float32)
and `soft_prompt_config.json` (`num_virtual_tokens`, `hidden_size`, `vocab_size`, `base_model`, `init`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from effllm.core.errors import CheckpointError, ConfigError

WEIGHTS_FILE = "soft_prompt.safetensors"
CONFIG_FILE = "soft_prompt_config.json"


class PromptEmbedding(nn.Module):
    """The token embedding with n prompt vectors at ids V .. V + n - 1."""

    def __init__(self, weight: nn.Parameter, prompt: torch.Tensor):
        super().__init__()
        self.weight = weight  # the table's own Parameter: a tied head and the checkpoint's names stay
        self.num_embeddings = weight.shape[0]
        self.prompt = nn.Parameter(prompt.detach().to(weight).clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.num_embeddings
        real = F.embedding(input_ids.clamp(max=vocab - 1), self.weight)
        virtual = F.embedding((input_ids - vocab).clamp(min=0, max=self.num_virtual_tokens - 1), self.prompt)
        return torch.where((input_ids >= vocab).unsqueeze(-1), virtual.to(real.dtype), real)


def add_soft_prompt(model: nn.Module, prompt: torch.Tensor) -> list[int]:
    """Give `model` the prompt vectors [n, hidden] (replacing any it had); returns the virtual ids."""
    stack = model.model
    hidden = model.config.hidden_size
    if prompt.dim() != 2 or prompt.shape[1] != hidden or prompt.shape[0] < 1:
        raise ConfigError(
            f"a soft prompt for this model is [n, {hidden}] (n >= 1); got {list(prompt.shape)}: was it "
            "trained for another model?"
        )
    stack.embed_tokens = PromptEmbedding(stack.embed_tokens.weight, prompt)
    return virtual_ids(model)


def initial_prompt(model: nn.Module, num_tokens: int) -> torch.Tensor:
    """Compress-Then-Prompt's initialisation: a copy of the first `num_tokens` rows of the embedding table."""
    weight = model.model.embed_tokens.weight
    if not 1 <= num_tokens <= weight.shape[0]:
        raise ConfigError(f"--soft-prompt-tokens must be in [1, {weight.shape[0]}], got {num_tokens}")
    return weight[:num_tokens].detach().float().clone()


def soft_prompt_of(model: Any) -> PromptEmbedding | None:
    """The model's PromptEmbedding, if it has one; `model` may be wrapped (DDP, eval's KV round trip)."""
    for _ in range(4):
        stack = getattr(model, "model", None)
        embedding = getattr(stack, "embed_tokens", None)
        if embedding is not None:
            return embedding if isinstance(embedding, PromptEmbedding) else None
        model = getattr(model, "module", None) or stack
    return None


def context_length(model: Any) -> int:
    """Real tokens a forward may hold: the model's context less its soft prompt."""
    return model.config.max_position_embeddings - len(virtual_ids(model))


def virtual_ids(model: nn.Module) -> list[int]:
    """The ids of the model's prompt vectors ([] without a soft prompt)."""
    embedding = soft_prompt_of(model)
    if embedding is None:
        return []
    return list(range(embedding.num_embeddings, embedding.num_embeddings + embedding.num_virtual_tokens))


def prompted_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """model(virtual ids + input_ids) without the virtual positions' logits: [B, T, vocab]."""
    ids = virtual_ids(model)
    if not ids:
        return model(input_ids)
    prefix = torch.tensor(ids, device=input_ids.device).expand(input_ids.shape[0], -1)
    return model(torch.cat([prefix, input_ids], dim=1))[:, len(ids) :]


def save_soft_prompt(
    model: nn.Module, folder: str | os.PathLike, base_model: str | None = None, init: str = "vocab"
) -> Path:
    embedding = soft_prompt_of(model)
    if embedding is None:
        raise ConfigError("the model has no soft prompt to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prompt_embeds": embedding.prompt.detach().float().cpu().contiguous()}, str(folder / WEIGHTS_FILE)
    )
    config = {
        "num_virtual_tokens": embedding.num_virtual_tokens,
        "hidden_size": embedding.prompt.shape[1],
        "vocab_size": embedding.num_embeddings,
        "base_model": base_model,
        "init": init,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_soft_prompt(folder: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(prompt [n, hidden] float32, its config) from a folder `save_soft_prompt` wrote."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{folder} holds no {WEIGHTS_FILE}; pass the --out folder of `effllm train --method soft-prompt`"
        )
    tensors = load_file(str(folder / WEIGHTS_FILE))
    if "prompt_embeds" not in tensors:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} has no 'prompt_embeds' tensor")
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    return tensors["prompt_embeds"].float(), config


def load_soft_prompt_into(model: nn.Module, folder: str | os.PathLike) -> list[int]:
    """Load the soft prompt at `folder` into `model` (checked against its vocabulary); the virtual ids."""
    prompt, config = load_soft_prompt(folder)
    vocab = config.get("vocab_size")
    if vocab is not None and vocab != model.config.vocab_size:
        raise ConfigError(
            f"the soft prompt at {folder} was trained for a model with vocab_size {vocab}, this one has "
            f"{model.config.vocab_size}; use it with its base model ({config.get('base_model')})"
        )
    return add_soft_prompt(model, prompt)
