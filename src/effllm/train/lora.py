"""`--method lora` and `--method qlora`: fine-tune a low-rank adapter on a frozen base (`models/lora.py`).

    effllm train --model M --data D --out runs/a --method lora --lora-rank 16 --lora-alpha 32 \\
        --lora-targets q_proj,v_proj [--lora-dropout 0.05 --lora-rslora]
    effllm train ... --method qlora [--lora-base-scheme w4a16]      # the base quantized first (RTN)

The adapters are added before the optimizer is built, so only they are trained (kept in float32 over a
bfloat16 or 4-bit base). Checkpoints hold the whole model, adapters included, and resume exactly; the run
writes the adapter alone in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained` loads, `effllm compress merge-lora` folds into the base, and
`models.peft_adapter.load_adapter` adds to an EffLLM model. QLoRA's base is W4A16 with groups of 32 (or
W8A16), quantized by round-to-nearest when the run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.lora import LoRAConfig, apply_lora
from effllm.models.peft_adapter import save_adapter

BASE_SCHEMES = ("w4a16", "w8a16")


def lora_config(cfg: Any) -> LoRAConfig:
    return LoRAConfig(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        targets=tuple(t for item in cfg.lora_targets for t in item.split(",") if t),  # "q_proj,v_proj" too
        dropout=cfg.lora_dropout,
        rslora=cfg.lora_rslora,
    )


def prepare_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """Quantize the base (qlora) and add the adapters, before the optimizer sees the parameters."""
    if cfg.method == "qlora":
        from effllm.compress.schemes import W4A16, W8A16, quantize_

        scheme = cfg.lora_base_scheme or "w4a16"
        if scheme not in BASE_SCHEMES:
            raise ConfigError(f"--lora-base-scheme must be one of {', '.join(BASE_SCHEMES)}, got {scheme!r}")
        quantize_(model, W4A16(group_size=32) if scheme == "w4a16" else W8A16(), show_progress=False)
    apply_lora(model, lora_config(cfg), seed=cfg.seed)
    return model


class LoRATraining:
    """The callback: writes the adapter, not the whole model, at the end of the run."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.config = lora_config(trainer.config)

    def save_final(self, model: nn.Module, folder: Path) -> None:
        base = self.trainer.config.model
        save_adapter(model, folder, self.config, base_model=str(base) if base else None)
        self.trainer._print(f"wrote the LoRA adapter (PEFT layout) to {folder}")
