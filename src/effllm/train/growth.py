"""G_stack (Du et al. 2024, "Stacking Your Transformers"): grow a trained model in depth by stacking it.

    big = stack(small, factor=4)            # layers [0 .. L-1] repeated 4 times: L -> 4L
    big = stack(small, order=[0, 0, 1, 1])  # any stacking list (layer i of the result copies order[i])

The embedding, final norm and head are copied; layer i of the grown model is a copy of layer
`order[i]` of the source (tongxuluo/prts `Stackingpt`), so with factor 1 the model is unchanged. The
grown model is an ordinary checkpoint: training continues from it with a fresh optimizer (`effllm train
--model GROWN`). The paper's guidelines: factor 4, and grow after d tokens with
log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 (N the grown model's parameters, C the FLOPs budget).
"""

from __future__ import annotations

import copy
import dataclasses
import math

from torch import nn

from effllm.core.errors import ConfigError
from effllm.models.transformer import CausalLM


def stacking_order(num_layers: int, factor: int) -> list[int]:
    """G_stack's list: the whole stack `factor` times."""
    if factor < 1:
        raise ConfigError(f"the growth factor must be at least 1, got {factor}")
    return list(range(num_layers)) * factor


def stack(model: CausalLM, factor: int | None = None, order: list[int] | None = None) -> CausalLM:
    """A new, deeper model whose layer i copies `model`'s layer order[i] (default: stacking_order)."""
    c = model.config
    order = (
        stacking_order(c.num_hidden_layers, 1 if factor is None else factor) if order is None else list(order)
    )
    if not order or not all(0 <= i < c.num_hidden_layers for i in order):
        raise ConfigError(f"a stacking list names layers 0 .. {c.num_hidden_layers - 1}, got {order}")
    if len(set(c.sliding_windows)) > 1:
        raise ConfigError("growing a model whose layers have different attention windows is not supported")
    config = dataclasses.replace(
        c, num_hidden_layers=len(order), sliding_windows=[c.sliding_windows[0]] * len(order)
    )
    grown = copy.deepcopy(model)
    grown.config = config
    layers = []
    for i, source in enumerate(order):
        layer = copy.deepcopy(model.model.layers[source])
        layer.self_attn.layer_idx = i
        layers.append(layer)
    grown.model.layers = nn.ModuleList(layers)
    if grown.model.layer_dropout is not None:
        grown.model.layer_dropout = None
    return grown


def growth_tokens(params: float, flops: float) -> float:
    """The paper's growth timing: tokens to train the small model before stacking it (their fit, eq. in
    §4.3: log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74)."""
    if params <= 0 or flops <= 1:
        raise ConfigError("growth timing needs a positive parameter count and a FLOPs budget above 1")
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(flops) - 5.74)
