"""LoRA (Hu et al. 2021): a frozen linear plus a trainable low-rank update, y = base(x) + s B A dropout(x).

    config = LoRAConfig(rank=16, alpha=32, targets=("q_proj", "v_proj"))
    apply_lora(model, config)          # in place: the targets gain lora_A [r, in] and lora_B [out, r]
    merge_lora(model)                  # in place: W += s B A, the adapters removed

Like the other weight formats here, LoRA is a module swap, not a model fork: a targeted `nn.Linear` (or
`QuantizedLinear`, for QLoRA) keeps its class's forward and its own tensors, gains two parameters and adds
their product. The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). A is
initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter changes nothing.
`models/peft_adapter.py` reads and writes PEFT's files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effllm.core.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama-family models
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ConfigError(f"the LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"the LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS) - {"all-linear"})
        if not self.targets or unknown:
            raise ConfigError(
                f"LoRA targets must name projections ({', '.join(PROJECTIONS)}) or all-linear, got "
                f"{', '.join(unknown) or 'none'}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def target_names(self) -> tuple[str, ...]:
        return PROJECTIONS if "all-linear" in self.targets else self.targets


class LoRAMixin:
    """Added to a linear's class: its forward plus the low-rank update (the adapter's parameters are
    `lora_A`, `lora_B`; the scale and dropout are plain attributes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        update = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (update * self.lora_scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A [out, in] in float32: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scaling


_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (LoRAMixin, base), {})
    return _CLASSES[base]


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, LoRAMixin)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every linear carrying an adapter."""
    return {name: m for name, m in model.named_modules() if is_lora(m)}


def apply_lora(
    model: nn.Module, config: LoRAConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> int:
    """Give every targeted projection of `model` an adapter (in place) and freeze everything else; returns
    how many. Adapters are kept in `dtype` (float32 by default: a bfloat16 or 4-bit base trains in full
    precision adapters, as QLoRA does)."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name in config.target_names():
                module = owner._modules.get(name)
                if module is None or is_lora(module):
                    continue
                device = next(t for t in (*module.parameters(), *module.buffers())).device
                a = torch.empty(config.rank, module.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # PEFT's init_lora_weights=True
                module.__class__ = _lora_class(type(module))
                module.lora_A = nn.Parameter(a.to(device, dtype))
                module.lora_B = nn.Parameter(
                    torch.zeros(module.out_features, config.rank, device=device, dtype=dtype)
                )
                module.lora_scaling = config.scaling
                module.lora_dropout = config.dropout
                count += 1
    if count == 0:
        raise ConfigError(f"no projection named {', '.join(config.target_names())} in the model")
    return count


def remove_lora(module: nn.Module) -> None:
    """The module back to its own class, without its adapter."""
    del module.lora_A, module.lora_B
    module.__class__ = module.__class__.__mro__[2]  # LoRA<Base> -> (LoRAMixin, Base)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its dense weight (W += s B A) and remove it; returns how many. A quantized
    base cannot take the update: dequantize first (ConfigError otherwise)."""
    modules = lora_modules(model)
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"{name} is {type(module).__mro__[2].__name__}: merging needs a dense base; load the base "
                "model unquantized and merge into it"
            )
        module.weight += module.delta_weight().to(module.weight.dtype)
        remove_lora(module)
    for p in model.parameters():
        p.requires_grad_(True)
    return len(modules)
