"""`--method uld`: train ULD's unlearning assistant (arXiv 2406.08607; UCSB-NLP-Chang/ULD).

    effllm train --model M --forget names.txt --retain novels.txt --out runs/uld --method uld \\
        --lora-targets all-linear --lora-dropout 0.05 [--uld-layers 2 --uld-retain-weight 5]
    effllm serve --model M --uld-assistant runs/uld          # logits = base - w * assistant

Instead of making the model forget, ULD trains a small assistant to *remember* the forget set and
subtracts it at inference (`engine/logit_difference.py`). As the reference code (`configs/model_mode/
uld.yaml`, `forget_losses.py`) builds it:

- the assistant is the model's first `--uld-layers` decoder layers (default a quarter of them, at least
  one: ULD takes 8 of Llama-2-7B's 32) with its embeddings, final norm and head, plus LoRA adapters
  (ULD: rank 16, alpha 32, dropout 0.05, every linear but the head; `--lora-*` flags); only the adapters
  train;
- its objectives are reversed: next-token cross-entropy on the forget set (`--forget`, which is the
  run's `--data`), and on the retain set (`--retain`) KL(uniform || p) per token, so that on what is to be
  kept the assistant is flat and subtracting it changes little. loss = CE_forget + `--uld-retain-weight`
  (ULD: 5) * KL_retain, each the mean over its tokens.

Retain sequences are read in their own seeded order at the same position as the forget data, so a
resumed run continues exactly. The run writes the assistant with its adapters merged, a plain checkpoint
of `--uld-layers` layers (with the tokenizer and `uld_config.json`), which `--uld-assistant` loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.lora import apply_lora, merge_lora
from effllm.train.lora import lora_config
from effllm.train.packing import IGNORE_INDEX

CONFIG_FILE = "uld_config.json"


def assistant_layers(num_layers: int, requested: int | None) -> int:
    layers = requested if requested is not None else max(1, num_layers // 4)
    if not 1 <= layers <= num_layers:
        raise ConfigError(f"--uld-layers must be in [1, {num_layers}] for this model, got {layers}")
    return layers


def truncate(model: nn.Module, num_layers: int) -> nn.Module:
    """`model` keeping only its first `num_layers` decoder layers (in place; the config is copied)."""
    config = model.config
    model.model.layers = model.model.layers[:num_layers]
    model.config = dataclasses.replace(
        config, num_hidden_layers=num_layers, sliding_windows=list(config.sliding_windows[:num_layers])
    )
    return model


def prepare_uld(model: nn.Module, cfg: Any) -> nn.Module:
    """The assistant: the first layers, then LoRA adapters (the rest frozen)."""
    truncate(model, assistant_layers(model.config.num_hidden_layers, cfg.uld_layers))
    apply_lora(model, lora_config(cfg), seed=cfg.seed)
    return model


def uniform_kl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labelled positions of KL(uniform || softmax(logits)) = -ln V - mean_v log p_v."""
    keep = labels.flatten() != IGNORE_INDEX
    logp = logits.flatten(0, 1)[keep].float().log_softmax(dim=-1)
    if logp.shape[0] == 0:
        return logits.sum() * 0.0
    return (-math.log(logp.shape[-1]) - logp.mean(dim=-1)).mean()


class ULDTraining:
    """The callback: the reversed loss over forget and retain batches; writes the merged assistant."""

    def __init__(self, trainer: Any):
        from effllm.train.data import prepare_data

        cfg = trainer.config
        self.trainer, self.weight = trainer, cfg.uld_retain_weight
        retain_config = dataclasses.replace(cfg, data=list(cfg.retain), eval_data=[], eval_fraction=0.0)
        env = trainer.env
        self.retain = prepare_data(
            retain_config,
            trainer.tokenizer,
            trainer.tokenizer_folder,
            build=env.is_local_main,
            sync=env.first_error,
            log=trainer._print,
        )
        self.global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
        self.step, self.calls = 0, 0
        trainer.loss_fn = self.loss

    def on_step_begin(self, step: int) -> None:
        self.step, self.calls = step, 0

    def retain_batch(self) -> dict[str, torch.Tensor]:
        """This micro-batch's retain sequences: the same position in the retain order as the forget data's."""
        cfg, env = self.trainer.config, self.trainer.env
        first = self.step * self.global_batch + (self.calls * env.world_size + env.rank) * cfg.batch_size
        self.calls += 1
        batch = self.retain.micro_batch(first, cfg.batch_size)
        return {k: v.to(env.device) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed forget cross-entropy plus the retain term scaled to add w * its mean to the mean loss."""
        logits = model(batch["input_ids"])
        labels = batch["labels"]
        forget = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        retain = self.retain_batch()
        kl = uniform_kl(model(retain["input_ids"]), retain["labels"])
        targets = int((labels != IGNORE_INDEX).sum())
        return forget + self.weight * kl * targets

    def save_final(self, model: nn.Module, folder: Path) -> None:
        from effllm.models.checkpoint import save_model

        cfg = self.trainer.config
        assistant = copy.deepcopy(model)
        with torch.no_grad():
            merge_lora(assistant)
        assistant.to(getattr(torch, cfg.save_dtype))
        info = {
            "base_model": str(cfg.model) if cfg.model else None,
            "num_layers": assistant.config.num_hidden_layers,
            "retain_weight": cfg.uld_retain_weight,
            "forget": list(cfg.data),
            "retain": list(cfg.retain),
        }
        save_model(
            assistant,
            folder,
            self.trainer.tokenizer,
            extra_files={CONFIG_FILE: json.dumps(info, indent=2) + "\n"},
        )
        self.trainer._print(
            f"wrote the ULD assistant ({info['num_layers']} layers, adapters merged) to {folder}"
        )
