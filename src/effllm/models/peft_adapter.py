"""LoRA adapters in PEFT's layout, so that `peft` loads EffLLM's adapters and EffLLM loads PEFT's.

A folder holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, lora_dropout,
use_rslora, ...) and `adapter_model.safetensors` with one `lora_A.weight` [r, in] and `lora_B.weight`
[out, r] per adapted module, named `base_model.model.<module path>.lora_{A,B}.weight` (the module paths are
the Hugging Face ones, which EffLLM's model keeps). PEFT features beyond plain LoRA on these projections
(DoRA, per-module ranks, biases, extra trainable modules) are refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effllm.core.errors import CheckpointError, ConfigError
from effllm.models.lora import PROJECTIONS, LoRAConfig, apply_lora, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change what an adapter computes: refused unless at these values.
_PLAIN = {
    "use_dora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
    "target_parameters": None,
    "lora_bias": False,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, config: LoRAConfig, base_model: str | None = None
) -> Path:
    """Write the model's adapters to `folder` in PEFT's layout (the base weights are not written)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().float().contiguous().cpu()
    if not tensors:
        raise ConfigError("the model has no LoRA adapter to save")
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_names()),
        "use_rslora": config.rslora,
        "inference_mode": True,
        "init_lora_weights": True,
        **_PLAIN,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return folder


def _raw_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"no {CONFIG_FILE} in {folder}; pass a PEFT adapter folder") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return raw


def adapter_base_model(folder: str | os.PathLike) -> str | None:
    """The base model an adapter names (`base_model_name_or_path`), if any."""
    return _raw_config(folder).get("base_model_name_or_path")


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` of a PEFT adapter folder; CheckpointError or ConfigError for what EffLLM cannot run."""
    path = Path(folder) / CONFIG_FILE
    raw = _raw_config(folder)
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (LORA only)")
    for key, plain in _PLAIN.items():
        value = raw.get(key, plain)
        if value != plain and (plain or value):  # a falsy default accepts any falsy value (None, {}, [])
            raise ConfigError(f"{path}: {key}={value!r} is not supported; EffLLM runs plain LoRA adapters")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ConfigError(
                f"{path}: target_modules as a regex ({targets!r}) is not supported; list the names"
            )
        targets = ["all-linear"]
    unknown = sorted(set(targets) - set(PROJECTIONS) - {"all-linear"})
    if unknown:
        raise ConfigError(f"{path}: target_modules {unknown} are not projections of a Llama-family layer")
    return LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", raw["r"])),
        targets=tuple(targets),
        dropout=float(raw.get("lora_dropout", 0.0)),
        rslora=bool(raw.get("use_rslora", False)),
    )


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRAConfig:
    """Add the PEFT adapter in `folder` to `model` (in place); returns its config."""
    config = read_adapter_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {folder} (adapters saved as .bin are not read)")
    tensors = load_file(path)
    apply_lora(model, config)
    modules = lora_modules(model)
    expected = {f"{PREFIX}{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    # PEFT names saved tensors without the adapter name; a few versions keep ".default"
    tensors = {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in tensors.items()
    }
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, module in modules.items():
        for ab in "AB":
            t = tensors[f"{PREFIX}{name}.lora_{ab}.weight"]
            target = getattr(module, f"lora_{ab}")
            if t.shape != target.shape:
                raise CheckpointError(
                    f"{path}: {name}.lora_{ab} has shape {tuple(t.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(t)
    return config
