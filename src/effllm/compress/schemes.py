"""`quantize_(model, config)`: the one verb, and a config dataclass per scheme mapped to its handler.

    from effllm.compress import quantize_, W4A16
    quantize_(model, W4A16(group_size=32, method="gptq"), calibration=ids)

Schemes: `W8A16` (int8 weights per channel), `W4A16` (int4 weights in groups, symmetric or not), `W8A8`
(int8 weights per channel, int8 activations per token, dynamic). Methods: `rtn` (round to nearest, no
data), `gptq` (`effllm.compress.gptq`), `awq` (weight-only schemes, `effllm.compress.awq`) and
`smoothquant` (W8A8, `effllm.compress.smoothquant`, then RTN). The data-driven methods need calibration
ids ([samples, tokens]) and run the decoder layer by layer (`calibration.LayerByLayer`). Each targeted
`nn.Linear` becomes a `models.quantized_linear.QuantizedLinear`, and config.json's `quantization_config`
(compressed-tensors) records the scheme, so `save_model` writes a checkpoint that EffLLM, vLLM and
llm-compressor load. Every layer's shape is checked before anything changes: bad input leaves the model
as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effllm.compress import awq, gptq, smoothquant
from effllm.compress.calibration import LAYER_LINEARS, LINEAR_GROUPS, LayerByLayer
from effllm.compress.rtn import QuantizedWeight, QuantSpec, rtn
from effllm.core.errors import InputError
from effllm.eval.progress import progress_bar
from effllm.models.layouts import set_module
from effllm.models.quantized_linear import QuantizedLinear, _matches


@dataclass
class QuantizeConfig:
    method: str = "rtn"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  # names or `re:` patterns left dense
    damp: float = 0.01  # GPTQ: dampening, a fraction of the mean Hessian diagonal
    block_size: int = 128  # GPTQ: columns per lazy-batch block
    act_order: bool = False  # GPTQ: visit columns by decreasing Hessian diagonal
    alpha: float = 0.5  # SmoothQuant migration strength
    methods = ("rtn", "gptq")
    activation_bits = 16

    def needs_calibration(self) -> bool:
        """Whether the method (or a scheme's data-driven steps) needs calibration ids."""
        return self.method != "rtn"

    def spec(self) -> QuantSpec:
        raise TypeError(
            f"{type(self).__name__} names no grid; use one of {', '.join(c.__name__ for c in SCHEMES.values())}"
        )

    def check(self) -> None:
        if self.method not in self.methods:
            raise InputError(
                f"method {self.method!r} does not apply to {type(self).__name__}; choose {', '.join(self.methods)}"
            )
        if not 0 <= self.alpha <= 1:
            raise InputError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0 < self.damp < 1:
            raise InputError(f"damp must lie in (0, 1), got {self.damp}")


@dataclass
class W8A16(QuantizeConfig):
    methods = ("rtn", "gptq", "awq")

    def spec(self) -> QuantSpec:
        return QuantSpec(8, None, True)


@dataclass
class W4A16(QuantizeConfig):
    group_size: int = 32
    symmetric: bool = True
    methods = ("rtn", "gptq", "awq")

    def spec(self) -> QuantSpec:
        return QuantSpec(4, self.group_size, self.symmetric)

    def check(self) -> None:
        super().check()
        if self.group_size not in (32, 64, 128):
            raise InputError(f"group size {self.group_size} is not supported; choose 32, 64 or 128")


@dataclass
class W8A8(QuantizeConfig):
    methods = ("rtn", "gptq", "smoothquant")
    activation_bits = 8

    def spec(self) -> QuantSpec:
        return QuantSpec(8, None, True)


@dataclass
class W4A8(QuantizeConfig):
    """QoQ's W4A8 (`effllm.compress.qoq`): progressive 4-bit weights in groups, int8 activations per token."""

    method: str = "gptq"
    group_size: int = 128
    alpha: float = 0.3  # SmoothLinear's migration strength (QoQ g128)
    rotate: bool = True  # Hadamard rotation of the block inputs
    smooth_linear: bool = True
    smooth_attention: bool = False  # pays off with a 4-bit KV cache (W4A8KV4 turns it on)
    clip: bool = False  # search the first level's range per channel
    kv_cache_dtype = "auto"
    activation_bits = 8

    def spec(self) -> QuantSpec:
        return QuantSpec(4, self.group_size, False)

    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.smooth_linear or self.smooth_attention or self.clip

    def check(self) -> None:
        super().check()
        if self.group_size not in (32, 64, 128):
            raise InputError(f"group size {self.group_size} is not supported; choose 32, 64 or 128")


@dataclass
class W4A8KV4(W4A8):
    """QoQ's W4A8KV4: W4A8 plus SmoothAttention, and the int4 KV cache asked of the engine."""

    smooth_attention: bool = True
    kv_cache_dtype = "int4"


SCHEMES: dict[str, type[QuantizeConfig]] = {
    "w8a16": W8A16,
    "w4a16": W4A16,
    "w8a8": W8A8,
    "w4a8": W4A8,
    "w4a8kv4": W4A8KV4,
}
Handler = Callable[[nn.Module, QuantizeConfig, torch.Tensor | None, bool], None]
HANDLERS: dict[type[QuantizeConfig], Handler] = {}


def register_scheme(config_cls: type[QuantizeConfig]) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        HANDLERS[config_cls] = handler
        return handler

    return decorate


def quantize_(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: torch.Tensor | None = None,
    show_progress: bool = True,
) -> nn.Module:
    """Quantize `model`'s linear layers in place as `config` says; returns the model."""
    config.check()
    if config.needs_calibration() and calibration is None:
        raise InputError(
            f"{type(config).__name__} with method {config.method} needs calibration ids; pass calibration= "
            "(see calibration_ids)"
        )
    targets = target_linears(model, config)
    if not targets:
        raise InputError("no linear layer is left to quantize; check the skip list")
    spec = config.spec()
    for name, linear in targets.items():
        spec.check(name, tuple(linear.weight.shape))
    HANDLERS[type(config)](model, config, calibration, show_progress)
    model.config.quantization_config = quantization_config(config, model)
    return model


def target_linears(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _matches(name, config.skip)
    }


def quantization_config(config: QuantizeConfig, model: nn.Module) -> dict[str, Any]:
    """compressed-tensors' `quantization_config` for what `config` did (read back by the layout); QoQ,
    which compressed-tensors has no name for, gets EffLLM's own (docs/compression.md)."""
    if isinstance(config, W4A8):
        return {
            "quant_method": "effllm",
            "format": "qoq",
            "weights": {"num_bits": 4, "levels": "int8 per channel, uint4 per group"},
            "group_size": config.group_size,
            "input_activations": {"num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True},
            "kv_cache_dtype": config.kv_cache_dtype,
            "ignore": sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear)),
            "effllm_method": config.method,
            "steps": {
                "rotate": config.rotate,
                "smooth_linear": config.smooth_linear,
                "smooth_linear_alpha": config.alpha,
                "smooth_attention": config.smooth_attention,
                "clip": config.clip,
            },
        }
    spec = config.spec()
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group",
        "group_size": spec.group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    inputs = None
    if config.activation_bits == 8:
        inputs = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "group_size": None,
            "actorder": None,
            "block_structure": None,
            "observer": None,
            "observer_kwargs": {},
        }
    ignore = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized" if config.activation_bits == 8 else "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "effllm_method": config.method,
    }


def _swap(model: nn.Module, name: str, qw: QuantizedWeight, config: QuantizeConfig) -> None:
    linear = model.get_submodule(name)
    spec = qw.spec
    module = QuantizedLinear.like(
        linear,
        bits=spec.bits,
        group_size=spec.group_size,
        symmetric=spec.symmetric,
        activation_bits=config.activation_bits,
    )
    module.set_codes(qw.q, qw.scale, qw.zero)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    set_module(model, name, module)


def _untie_if_needed(model: nn.Module, targets: dict[str, nn.Linear]) -> None:
    if "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
        head = model.lm_head
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


@register_scheme(W8A16)
@register_scheme(W4A16)
@register_scheme(W8A8)
def _quantize_linears(model: nn.Module, config: QuantizeConfig, ids: torch.Tensor | None, show: bool) -> None:
    spec = config.spec()
    targets = target_linears(model, config)
    _untie_if_needed(model, targets)
    done: set[str] = set()
    if config.method != "rtn":
        runner = LayerByLayer(model, ids)
        layers = list(runner.layers())
        with progress_bar(len(layers), f"{config.method} calibration", show, unit="layer") as bar:
            for i, layer in layers:
                prefix = f"model.layers.{i}."
                names = [n for n in LAYER_LINEARS if prefix + n in targets]
                _calibrate_layer(layer, names, runner, config, spec)
                done.update(prefix + n for n in names)
                runner.run(layer, advance=True)  # the next layer sees this one's quantized outputs
                bar.update(1)
    for name in targets:  # RTN for the rest (every layer with rtn; lm_head and the like otherwise)
        if name not in done:
            _swap(model, name, rtn(targets[name].weight.detach(), spec), config)


def _calibrate_layer(
    layer: nn.Module, names: list[str], runner: LayerByLayer, config: QuantizeConfig, spec: QuantSpec
) -> None:
    """Quantize the linears `names` of one decoder layer with config.method (not rtn) and swap them in."""
    if config.method in ("awq", "smoothquant"):
        _rescale_layer(layer, names, runner, config, spec)
        for n in names:
            _swap(layer, n, rtn(layer.get_submodule(n).weight.detach(), spec), config)
        return
    hessians = {n: gptq.HessianAccumulator(layer.get_submodule(n).in_features) for n in names}
    runner.run(layer, observe={n: hessians[n].add for n in names})
    for n in names:
        linear = layer.get_submodule(n)
        qw = gptq.gptq(
            linear.weight.detach(),
            hessians[n].hessian(),
            spec,
            config.damp,
            config.block_size,
            config.act_order,
        )
        _swap(layer, n, qw, config)


MAX_AWQ_TOKENS = 4096  # input rows kept per group for AWQ's grid search


def _rescale_layer(
    layer: nn.Module, names: list[str], runner: LayerByLayer, config: QuantizeConfig, spec: QuantSpec
) -> None:
    """AWQ's or SmoothQuant's per-channel scales, group by group, folded into the float layer."""
    previous = {
        "attn_in": layer.input_layernorm,
        "mlp_in": layer.post_attention_layernorm,
        "mlp_out": layer.mlp.up_proj,
        "attn_out": layer.self_attn.v_proj,
    }
    for group, members in LINEAR_GROUPS.items():
        members = [n for n in members if n in names]
        if not members:
            continue
        if config.method == "smoothquant" and group not in ("attn_in", "mlp_in"):
            continue
        prev = previous[group]
        linears = [layer.get_submodule(n) for n in members]
        if isinstance(prev, nn.Linear) and (
            prev.out_features != linears[0].in_features or type(prev) is not nn.Linear
        ):
            continue  # o_proj with GQA (v_proj narrower), or an already-quantized previous linear
        if config.method == "smoothquant":
            stat = smoothquant.ChannelMax(linears[0].in_features)
            runner.run(layer, observe={members[0]: stat.add})
            s = smoothquant.smoothing_scales(stat.value, [m.weight for m in linears], config.alpha)
        else:
            rows: list[torch.Tensor] = []
            runner.run(
                layer,
                observe={members[0]: lambda x, rows=rows: rows.append(x.reshape(-1, x.shape[-1]).float())},
            )
            x = torch.cat(rows)
            if x.shape[0] > MAX_AWQ_TOKENS:
                x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_AWQ_TOKENS]]
            s = awq.search_scales(x, [m.weight for m in linears], spec)
        awq.fold_scales(prev, linears, s.to(linears[0].weight.device))


from effllm.compress import qoq  # noqa: E402, F401  (registers the W4A8 and W4A8KV4 handlers)
