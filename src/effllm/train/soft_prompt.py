"""`--method soft-prompt`: learn a soft prompt for a frozen (often compressed) model (Compress-Then-Prompt).

    effllm train --model runs/pruned --data D --out runs/prompt --method soft-prompt --soft-prompt-tokens 20
    effllm generate --model runs/pruned --soft-prompt runs/prompt "..."    # and serve, eval perplexity

The model's weights are frozen; n prompt vectors (`models/soft_prompt.py`), initialised as the paper's
code does from the first n rows of the embedding table, are the only trainable parameters. Every training
and held-out sequence is run with the n virtual tokens before it, whose positions carry no label, so the
loss is the ordinary next-token loss of the real tokens under the prompt. The paper's optimizer is
Adafactor at lr 0.3 with a constant schedule; `--optimizer adamw --lr 1e-2 --schedule constant` is what
EffLLM's experiment (docs/training-methods.md) used. Checkpoints hold the whole model with its prompt and
resume exactly; the run writes the prompt alone (`soft_prompt.safetensors`, `soft_prompt_config.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.soft_prompt import add_soft_prompt, initial_prompt, prompted_logits, save_soft_prompt
from effllm.train.packing import IGNORE_INDEX


def prepare_soft_prompt(model: nn.Module, cfg: Any) -> nn.Module:
    """Freeze the model and give it the initial prompt, before the optimizer sees the parameters."""
    n = cfg.soft_prompt_tokens
    limit = model.config.max_position_embeddings
    if cfg.seq_len + n > limit:
        raise ConfigError(
            f"--seq-len {cfg.seq_len} plus {n} soft-prompt tokens exceeds the model's context ({limit}); "
            "lower --seq-len or --soft-prompt-tokens"
        )
    model.requires_grad_(False)
    add_soft_prompt(model, initial_prompt(model, n))
    return model


def prompted_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of -log p(label) of the real tokens, the soft prompt before each sequence."""
    logits = prompted_logits(model, batch["input_ids"])
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class SoftPromptTraining:
    """The callback: prompted training and held-out losses; writes the prompt alone at the end."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        trainer.loss_fn = prompted_loss
        trainer.eval_loss_fn = prompted_loss

    def save_final(self, model: nn.Module, folder: Path) -> None:
        base = self.trainer.config.model
        save_soft_prompt(model, folder, base_model=str(base) if base else None)
        self.trainer._print(f"wrote the soft prompt to {folder}")
