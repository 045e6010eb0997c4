"""The roofline: the fastest a model's prefill, decode step or whole generate task can run on a machine.

Each op takes max(ops / peak, bytes / bandwidth), the peak being the hardware's matmul rate for the
op's operand width; it is memory-bound when the bytes term wins. A phase takes the sum of its ops'
times (ops run one after another). A generate task is a prefill of P tokens, which yields the first
output token, then O-1 decode steps at contexts P, P+1, ..., P+O-2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from effllm.analyze.hardware import Hardware, get_hardware
from effllm.analyze.layer_costs import Bits, OpCost, Sparsity, step_costs
from effllm.analyze.shapes import load_model_config
from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

PHASES = ("prefill", "decode", "generate")


@dataclass(frozen=True)
class LayerRoofline:
    """One op on the roofline: its cost per instance and the time that cost takes, summed over steps."""

    cost: OpCost
    peak_flops: float
    compute_time_s: float
    memory_time_s: float
    time_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_time_s > self.memory_time_s else "memory"

    @property
    def arithmetic_intensity(self) -> float:
        return self.cost.ops / self.cost.bytes if self.cost.bytes else float("inf")

    def plus(self, other: LayerRoofline) -> LayerRoofline:
        return LayerRoofline(
            self.cost.plus(other.cost),
            self.peak_flops,
            self.compute_time_s + other.compute_time_s,
            self.memory_time_s + other.memory_time_s,
            self.time_s + other.time_s,
        )

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {
            "name": c.name,
            "kind": c.kind,
            "count": c.count,
            "ops": c.ops,
            "bytes": c.bytes,
            "load_weight": c.load_weight,
            "load_act": c.load_act,
            "store_act": c.store_act,
            "load_kv": c.load_kv,
            "store_kv": c.store_kv,
            "arithmetic_intensity": _finite(self.arithmetic_intensity),
            "peak_flops": self.peak_flops,
            "time_s": self.time_s,
            "bound": self.bound,
        }


@dataclass(frozen=True)
class Total:
    """Sums over a phase's ops (each op's figures times its count).

    `tokens` are those the phase processes: prompt tokens for a prefill, generated tokens for decode
    steps and for a whole generate task (whose first token comes from its prefill).
    """

    ops: float
    bytes: float
    compute_time_s: float
    memory_time_s: float
    time_s: float
    tokens: int

    @property
    def bound(self) -> str:
        return "compute" if self.compute_time_s > self.memory_time_s else "memory"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "bytes": self.bytes,
            "time_s": self.time_s,
            "bound": self.bound,
            "arithmetic_intensity": _finite(self.ops / self.bytes),
            "compute_time_s": self.compute_time_s,
            "memory_time_s": self.memory_time_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass(frozen=True)
class RooflineReport:
    """A phase on a machine: per-op rooflines (`layers`) and their `total`."""

    model: str
    hardware: Hardware
    phase: str
    batch: int
    prompt: int | None
    context: int | None
    output: int | None
    bits: Bits
    fused_attention: bool
    layers: list[LayerRoofline]
    total: Total
    parts: dict[str, Total] = field(default_factory=dict)  # generate: its prefill and decode totals
    sparsity: Sparsity | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "hardware": self.hardware.name,
            "phase": self.phase,
            "batch": self.batch,
            "prompt": self.prompt,
            "context": self.context,
            "output": self.output,
            "bits": {"w": self.bits.w, "a": self.bits.a, "kv": self.bits.kv},
            "fused_attention": self.fused_attention,
            "sparsity": None if self.sparsity is None else str(self.sparsity),
            "bandwidth": self.hardware.bandwidth,
            "layers": [layer.to_dict() for layer in self.layers],
            "total": self.total.to_dict(),
        }
        out.update({name: part.to_dict() for name, part in self.parts.items()})
        return out


# ---------------------------------------------------------------------- evaluation
def layer_roofline(cost: OpCost, hardware: Hardware) -> LayerRoofline:
    """Place one op under the roof: time = max(ops / peak, bytes / bandwidth)."""
    peak = hardware.peak_for_bits(cost.operand_bits)
    compute, memory = cost.ops / peak, cost.bytes / hardware.bandwidth
    return LayerRoofline(cost, peak, compute, memory, max(compute, memory))


def _total(layers: list[LayerRoofline], tokens: int) -> Total:
    def s(get) -> float:
        return sum(get(layer) * layer.cost.count for layer in layers)

    return Total(
        ops=s(lambda r: r.cost.ops),
        bytes=s(lambda r: r.cost.bytes),
        compute_time_s=s(lambda r: r.compute_time_s),
        memory_time_s=s(lambda r: r.memory_time_s),
        time_s=s(lambda r: r.time_s),
        tokens=tokens,
    )


def _step(
    config: ModelConfig,
    hardware: Hardware,
    batch: int,
    new: int,
    cached: int,
    bits: Bits,
    fused: bool,
    sparsity: Sparsity | None = None,
) -> list[LayerRoofline]:
    costs = step_costs(config, batch, new, cached, bits, fused, sparsity)
    return [layer_roofline(cost, hardware) for cost in costs]


def _merge(steps: list[list[LayerRoofline]]) -> list[LayerRoofline]:
    merged = {layer.cost.name: layer for layer in steps[0]}
    for step in steps[1:]:
        for layer in step:
            merged[layer.cost.name] = merged[layer.cost.name].plus(layer)
    return list(merged.values())


def analyze(
    model: str | os.PathLike | ModelConfig,
    hardware: str | Hardware,
    phase: str,
    batch: int = 1,
    prompt: int | None = None,
    context: int | None = None,
    output: int | None = None,
    w_bits: float = 16,
    a_bits: float = 16,
    kv_bits: float | None = None,
    fused_attention: bool = True,
    sparsity: str | Sparsity | None = None,
) -> RooflineReport:
    """Roofline of one phase (`sparsity` "N:M": the decoder linears pruned so, run by N:M hardware).

    prefill: `prompt` new tokens per sequence on top of `context` cached ones (0 unless a chunk);
    decode: one token per sequence at `context` cached tokens;
    generate: a prefill of `prompt` tokens, then `output` - 1 decode steps.
    """
    config = load_model_config(model)
    hw = get_hardware(hardware)
    bits = Bits(w_bits, a_bits, kv_bits)
    sparse = Sparsity.parse(sparsity)
    if phase not in PHASES:
        raise ConfigError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    _positive(batch=batch)
    parts: dict[str, Total] = {}
    if phase == "prefill":
        _positive(prompt=prompt)
        _not_negative(context=context or 0)
        layers = _step(config, hw, batch, prompt, context or 0, bits, fused_attention, sparse)
        total = _total(layers, batch * prompt)
    elif phase == "decode":
        _not_negative(context=context)
        layers = _step(config, hw, batch, 1, context, bits, fused_attention, sparse)
        total = _total(layers, batch)
    else:
        _positive(prompt=prompt, output=output)
        prefill = _step(config, hw, batch, prompt, 0, bits, fused_attention, sparse)
        decodes = [
            _step(config, hw, batch, 1, c, bits, fused_attention, sparse)
            for c in range(prompt, prompt + output - 1)
        ]
        layers = _merge([prefill, *decodes])
        parts["prefill"] = _total(prefill, batch * prompt)
        if decodes:
            parts["decode"] = _total(_merge(decodes), batch * (output - 1))
        total = _total(layers, batch * output)
    name = model if isinstance(model, str | os.PathLike) else config.model_type
    return RooflineReport(
        str(name),
        hw,
        phase,
        batch,
        prompt,
        context,
        output,
        bits,
        fused_attention,
        layers,
        total,
        parts,
        sparse,
    )


def roofline_tokens_per_s(
    model: str | os.PathLike | ModelConfig,
    hardware: str | Hardware,
    phase: str,
    batch: int,
    tokens: int,
    w_bits: float = 16,
    a_bits: float = 16,
    kv_bits: float | None = None,
) -> float:
    """The roofline's tokens/s: a prefill of `tokens` prompt tokens (B x P / time), or a decode step
    at `tokens` cached tokens (B / time)."""
    if phase not in ("prefill", "decode"):
        raise ConfigError(f"roofline tokens/s is defined for prefill or decode, not {phase!r}")
    length = {"prompt": tokens} if phase == "prefill" else {"context": tokens}
    report = analyze(model, hardware, phase, batch, w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, **length)
    return report.total.tokens_per_s


def roofline_fraction(
    model: str | os.PathLike | ModelConfig,
    hardware: str | Hardware,
    phase: str,
    batch: int,
    tokens: int,
    measured_tokens_per_s: float,
    w_bits: float = 16,
    a_bits: float = 16,
    kv_bits: float | None = None,
) -> float:
    """Measured tokens/s as a fraction of the roofline's (1.0 = at the hardware's limit).

    `tokens` is the prompt length for prefill and the context (cached tokens) for decode; batch,
    bits and hardware must be those of the measured run.
    """
    if measured_tokens_per_s < 0:
        raise ConfigError(f"measured tokens/s must not be negative, got {measured_tokens_per_s}")
    ideal = roofline_tokens_per_s(model, hardware, phase, batch, tokens, w_bits, a_bits, kv_bits)
    return measured_tokens_per_s / ideal


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise ConfigError(f"{name} must be a positive number of tokens or sequences, got {value}")


def _not_negative(**values: int | None) -> None:
    for name, value in values.items():
        if value is None or value < 0:
            raise ConfigError(f"{name} must be given and not negative, got {value}")


def _finite(x: float) -> float | None:
    return None if x == float("inf") else x
