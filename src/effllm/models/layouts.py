"""Runtime layouts of stored weights: config.json's `effllm.compression` section rebuilds them on load.

A compressed checkpoint holds tensors that an `nn.Linear` does not (packed integers, scales, zeros). Its
config.json says which layout wrote them, under `"effllm": {"compression": {"format": NAME, ...}}`, and
the loader calls the function registered for NAME on the freshly built model, still on the meta device
and before any tensor is read. The function swaps modules for the ones that own those tensors (as
parameters or persistent buffers), so that `model.state_dict()` names exactly what the files hold; the
loader then reads each tensor into place (gpt-fast's load path: meta model, swap, assign). The layout is
chosen by config.json, never by file names.

    @register_layout("w8a16")
    def build(model: CausalLM, section: dict) -> None:
        swap_linears(model, lambda linear: Int8Linear.empty_like(linear), skip=section.get("ignore", []))

A new format is this one registration plus its module (and kernel); `load_model` does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from effllm.core.errors import CheckpointError

LayoutBuilder = Callable[[nn.Module, dict[str, Any]], None]
LAYOUTS: dict[str, LayoutBuilder] = {}


def register_layout(name: str) -> Callable[[LayoutBuilder], LayoutBuilder]:
    """Register the function that rebuilds format `name`'s modules on a meta-device model."""

    def decorate(builder: LayoutBuilder) -> LayoutBuilder:
        LAYOUTS[name] = builder
        return builder

    return decorate


def compression_section(effllm_section: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's `effllm.compression` mapping, or None for dense weights."""
    section = effllm_section.get("compression")
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("format"), str):
        raise CheckpointError('config.json\'s "effllm.compression" must be a mapping with a "format" name')
    return section


def quantization_section(quantization_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The layout section for a Hugging Face `quantization_config` (None when there is none).

    compressed-tensors, gptq and awq map to the layouts of those names (the whole mapping is the section),
    EffLLM's own (`quant_method: effllm`) to the layout its `format` names;
    formats EffLLM cannot read yet are refused here, with what to do instead."""
    if quantization_config is None:
        return None
    method = quantization_config.get("quant_method")
    if method in ("compressed-tensors", "gptq", "awq"):
        return {**quantization_config, "layout": method}
    if method == "effllm":  # EffLLM's own formats (QoQ): the layout its "format" names
        return {**quantization_config, "layout": quantization_config.get("format")}
    raise CheckpointError(
        f"config.json's quantization_config is {method!r}, which EffLLM cannot load yet (it reads "
        "compressed-tensors, gptq and awq); convert the checkpoint with llm-compressor or load the dense model"
    )


def apply_layout(model: nn.Module, section: dict[str, Any] | None) -> None:
    """Swap `model`'s modules for the runtime layout `section` describes (nothing for dense weights)."""
    if section is None:
        return
    name = section.get("layout", section.get("format"))
    if name not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS)) or "none in this install"
        raise CheckpointError(
            f"config.json's effllm.compression names the layout {name!r}, which this EffLLM cannot load "
            f"(known: {known}); upgrade EffLLM or load the dense checkpoint"
        )
    LAYOUTS[name](model, section)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (in place of what is there)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def swap_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace each submodule for which `replace(name, module)` returns a module; returns the names swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        new = replace(name, module) if name else None
        if new is not None:
            set_module(model, name, new)
            swapped.append(name)
    return swapped
