"""Several LoRA adapters over one base, chosen per token: what `effllm serve --lora NAME=PATH` runs.

    names = load_adapters(model, {"austen": "runs/a", "selp": "runs/b"})   # PEFT folders
    with adapter_rows(model, {0: rows_of_austen, 1: rows_of_selp}):       # this forward's tokens
        logits = model(ids)

Each projection some adapter targets becomes a `MultiLoRA<Base>` (a module swap, as `models/lora.py`):
its own forward, plus for each adapter in use the low-rank update of that adapter's rows only,
y[rows] += (x[rows] A_a^T)(s_a B_a)^T, the scale folded into B at load. Rows of the base alone, and
adapters that do not target a projection, get nothing added. Adapters may differ in rank, targets and
scale. Which rows belong to which adapter is set once per forward on a context the modules share
(`adapter_rows`), so the model's call signature is unchanged; the engine sets it from each request's
adapter (`EngineConfig.lora`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.lora import lora_modules, remove_lora
from effllm.models.peft_adapter import load_adapter


class AdapterContext:
    """The rows of the current forward each adapter serves: {adapter index: LongTensor of rows}."""

    def __init__(self) -> None:
        self.groups: dict[int, torch.Tensor] = {}


class MultiLoRAMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        groups = self.lora_context.groups
        if not groups:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for index, rows in groups.items():
            pair = self.lora_pairs.get(index)
            if pair is None:
                continue
            a, b = pair
            update = (flat_x.index_select(0, rows).to(a.dtype) @ a.T) @ b.T
            flat_y.index_add_(0, rows, update.to(flat_y.dtype))
        return flat_y.view(y.shape)


_CLASSES: dict[type, type] = {}


def _multi_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"MultiLoRA{base.__name__}", (MultiLoRAMixin, base), {})
    return _CLASSES[base]


def is_multi_lora(module: nn.Module) -> bool:
    return isinstance(module, MultiLoRAMixin)


def load_adapters(
    model: nn.Module, adapters: Mapping[str, str | os.PathLike], dtype: torch.dtype | None = None
) -> list[str]:
    """Load PEFT adapters (name -> folder) into `model` for per-row serving; returns the names in index
    order (index i serves `names[i]`). Each adapter's tensors are kept in `dtype` (the model's by default)."""
    if not adapters:
        return []
    if lora_modules(model) or any(is_multi_lora(m) for m in model.modules()):
        raise ConfigError("the model already carries adapters; load the base model for --lora")
    dtype = dtype or next(model.parameters()).dtype
    context = AdapterContext()
    pairs: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    modules: dict[str, nn.Module] = {}
    names = list(adapters)
    for index, name in enumerate(names):
        load_adapter(model, adapters[name])  # as a single LoRA, then taken apart
        for module_name, module in lora_modules(model).items():
            a = module.lora_A.detach().to(dtype)
            b = (module.lora_B.detach().float() * module.lora_scaling).to(dtype)
            remove_lora(module)
            pairs.setdefault(module_name, {})[index] = (a, b)
            modules[module_name] = module
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, module in modules.items():
        module.__class__ = _multi_class(type(module))
        module.lora_pairs = pairs[module_name]
        module.lora_context = context
    model.adapter_context = context
    return names


@contextlib.contextmanager
def adapter_rows(model: nn.Module, groups: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, the model's forward adds adapter i's update to rows `groups[i]` (flattened
    [batch * tokens] rows of the input)."""
    context = getattr(model, "adapter_context", None)
    if context is None:
        raise ConfigError("the model has no adapters loaded (models.multi_lora.load_adapters)")
    context.groups = dict(groups)
    try:
        yield
    finally:
        context.groups = {}
