"""Operations and bytes of every op in one forward step of a Llama-family model (LLM-Viewer's accounting).

A step feeds `new` tokens per sequence to a batch whose KV cache already holds `cached` tokens per
sequence: a prefill is (new=P, cached=0), a decode step (new=1, cached=C), a prefill chunk anything
between. Each op reads weights, activations and KV cache and writes activations or KV cache; nothing
is assumed to stay on chip between ops, except inside the fused attention kernel.

Element-wise op counts follow LLM-Viewer (norm 7, residual add 1, activation 2, softmax 5 per element),
without its three quirks: the SwiGLU product runs over intermediate_size, lm_head counts 2 ops per
multiply-add, and attention reads q over all query heads. Attention counts only the causal (and
sliding-window) part of the score matrix when fused, as FlashAttention skips masked blocks; RoPE is
not counted (fused into the projections' epilogue by fast engines).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig


@dataclass(frozen=True)
class Bits:
    """Widths of weights, activations and KV cache (kv defaults to the activation width)."""

    w: float = 16
    a: float = 16
    kv: float | None = None

    def __post_init__(self) -> None:
        if self.kv is None:
            object.__setattr__(self, "kv", self.a)
        for name in ("w", "a", "kv"):
            value = getattr(self, name)
            if not 0 < value <= 32:
                raise ConfigError(f"{name}_bits must be in (0, 32], got {value}")

    @property
    def small(self) -> float:
        """Norm weights and biases are never quantized: they stay in 16 bits (32 in an fp32 model)."""
        return max(self.w, 16)


@dataclass(frozen=True)
class Sparsity:
    """N:M weight sparsity of the decoder's linears, as `effllm compress prune --pattern N:M` makes it:
    `zeros` of every `group` consecutive inputs are zero.

    Modelled as hardware that executes the pattern runs it (GPUs' sparse tensor cores for 2:4,
    FlightLLM-style accelerators for N:M): multiply-adds only over the kept weights, and the weights
    stored compressed, each kept value with a ceil(log2(group))-bit position index (NVIDIA's 2:4 format:
    2 bits per kept value). Hardware without N:M support computes the dense matrix: leave it out there."""

    zeros: int
    group: int

    def __post_init__(self) -> None:
        if not 0 < self.zeros < self.group:
            raise ConfigError(f"N:M sparsity needs 0 < N < M, got {self.zeros}:{self.group}")

    @classmethod
    def parse(cls, spec: str | Sparsity | None) -> Sparsity | None:
        if spec is None or isinstance(spec, Sparsity):
            return spec
        try:
            zeros, group = (int(x) for x in str(spec).split(":"))
        except ValueError:
            raise ConfigError(
                f"--sparsity takes N:M (N zeros in every M weights, e.g. 2:4), not {spec!r}; unstructured "
                "sparsity runs no faster on any hardware modelled here"
            ) from None
        return cls(zeros, group)

    @property
    def density(self) -> float:
        return (self.group - self.zeros) / self.group

    @property
    def index_bits(self) -> int:
        return max(1, (self.group - 1).bit_length())

    def __str__(self) -> str:
        return f"{self.zeros}:{self.group}"


@dataclass(frozen=True)
class OpCost:
    """One op: operations and bytes moved by one instance; `count` instances run per step."""

    name: str
    kind: str  # linear | attention | elementwise | embedding
    ops: float = 0.0
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0
    operand_bits: float = 16  # width of the operands, which picks the hardware's matmul peak
    count: int = 1

    @property
    def bytes(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    def plus(self, other: OpCost) -> OpCost:
        """Ops and bytes of both (same op in two steps)."""
        return replace(self, **{k: getattr(self, k) + getattr(other, k) for k in _SUMMED})


_SUMMED = ("ops", "load_weight", "load_act", "store_act", "load_kv", "store_kv")


# ---------------------------------------------------------------------- single ops
def linear(
    name: str,
    in_features: int,
    out_features: int,
    tokens: int,
    bits: Bits,
    bias: bool = False,
    to_kv: bool = False,
    count: int = 1,
    sparsity: Sparsity | None = None,
) -> OpCost:
    """y = x W^T (+ b) over `tokens` rows; k/v projections write the KV cache instead of an activation.
    With N:M `sparsity`, multiply-adds and weight bytes cover the kept weights (plus their indices)."""
    out = out_features * tokens
    density = sparsity.density if sparsity else 1.0
    weight_bits = density * (bits.w + (sparsity.index_bits if sparsity else 0))
    return OpCost(
        name,
        "linear",
        ops=2 * in_features * out * density + (out if bias else 0),
        load_weight=in_features * out_features * weight_bits / 8
        + (out_features * bits.small / 8 if bias else 0),
        load_act=in_features * tokens * bits.a / 8,
        store_act=0 if to_kv else out * bits.a / 8,
        store_kv=out * bits.kv / 8 if to_kv else 0,
        operand_bits=max(bits.w, bits.a),
        count=count,
    )


def elementwise(
    name: str,
    elements: int,
    ops_per_element: float,
    inputs: int,
    bits: Bits,
    weight_elements: int = 0,
    count: int = 1,
) -> OpCost:
    """An op that reads `inputs` tensors of `elements` values and writes one of the same size."""
    return OpCost(
        name,
        "elementwise",
        ops=ops_per_element * elements,
        load_weight=weight_elements * bits.small / 8,
        load_act=inputs * elements * bits.a / 8,
        store_act=elements * bits.a / 8,
        operand_bits=bits.a,
        count=count,
    )


def attended_keys(cached: int, new: int, window: int | None) -> int:
    """Sum over the new queries of the keys each attends: query j (0-based) sees min(cached + j + 1, window)."""
    first, last = cached + 1, cached + new
    if window is None or window >= last:
        return (first + last) * new // 2
    if window < first:
        return new * window
    return (first + window) * (window - first + 1) // 2 + (last - window) * window


def kv_span(cached: int, new: int, window: int | None) -> int:
    """Distinct cached-or-new positions the step's queries attend (each K/V row read at least once)."""
    total = cached + new
    return total if window is None else total - max(0, cached + 1 - window)


def attention(
    config: ModelConfig,
    batch: int,
    new: int,
    cached: int,
    window: int | None,
    bits: Bits,
    fused: bool = True,
    name: str = "attention",
    count: int = 1,
) -> list[OpCost]:
    """softmax(q k^T / sqrt(d)) v for every query head; K and V come from the (GQA-shared) cache.

    Fused (FlashAttention / paged decode): one kernel reads q and each K/V row once, writes o, and
    computes only the unmasked scores. Unfused: three kernels through a dense score matrix in memory.
    """
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    a, kv = bits.a / 8, bits.kv / 8
    span = kv_span(cached, new, window)
    q_bytes = batch * new * heads * d * a
    k_bytes = batch * span * kv_heads * d * kv  # V is the same size
    width = max(bits.a, bits.kv)
    if fused:
        scores = batch * heads * attended_keys(cached, new, window)
        return [
            OpCost(
                name,
                "attention",
                ops=(4 * d + 5) * scores,
                load_act=q_bytes,
                store_act=q_bytes,
                load_kv=2 * k_bytes,
                operand_bits=width,
                count=count,
            )
        ]
    scores = batch * heads * new * span  # the full rectangle: masked entries are computed too
    return [
        OpCost(
            f"{name}.qk_matmul",
            "attention",
            ops=2 * d * scores,
            load_act=q_bytes,
            store_act=scores * a,
            load_kv=k_bytes,
            operand_bits=width,
            count=count,
        ),
        OpCost(
            f"{name}.softmax",
            "attention",
            ops=5 * scores,
            load_act=scores * a,
            store_act=scores * a,
            operand_bits=bits.a,
            count=count,
        ),
        OpCost(
            f"{name}.sv_matmul",
            "attention",
            ops=2 * d * scores,
            load_act=scores * a,
            store_act=q_bytes,
            load_kv=k_bytes,
            operand_bits=width,
            count=count,
        ),
    ]


# ---------------------------------------------------------------------- one forward step
def step_costs(
    config: ModelConfig,
    batch: int,
    new: int,
    cached: int,
    bits: Bits,
    fused_attention: bool = True,
    sparsity: Sparsity | None = None,
) -> list[OpCost]:
    """Every op of one forward over `new` tokens per sequence, with logits for each sequence's last token.
    `sparsity` applies to the decoder layers' linears (pruning leaves the embedding and lm_head dense)."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers
    n = batch * new  # tokens in the step

    ops = [
        OpCost(
            "embed_tokens",
            "embedding",
            load_weight=n * h * bits.w / 8,
            store_act=n * h * bits.a / 8,
            operand_bits=bits.w,
        )
    ]
    ops.append(elementwise("input_layernorm", n * h, 7, 1, bits, weight_elements=h, count=layers))
    ops.append(linear("q_proj", h, q_out, n, bits, bias=config.qkv_bias, count=layers, sparsity=sparsity))
    ops.append(
        linear(
            "k_proj", h, kv_out, n, bits, bias=config.qkv_bias, to_kv=True, count=layers, sparsity=sparsity
        )
    )
    ops.append(
        linear(
            "v_proj", h, kv_out, n, bits, bias=config.qkv_bias, to_kv=True, count=layers, sparsity=sparsity
        )
    )
    windows = Counter(config.sliding_windows)  # layers sharing a window share one attention entry
    for window, group in windows.items():
        name = "attention" if len(windows) == 1 else f"attention[{'full' if window is None else window}]"
        ops += attention(config, batch, new, cached, window, bits, fused_attention, name, count=group)
    ops.append(linear("o_proj", q_out, h, n, bits, bias=config.o_bias, count=layers, sparsity=sparsity))
    ops.append(elementwise("attn_residual", n * h, 1, 2, bits, count=layers))
    ops.append(elementwise("post_attention_layernorm", n * h, 7, 1, bits, weight_elements=h, count=layers))
    ops.append(linear("gate_proj", h, inter, n, bits, bias=config.mlp_bias, count=layers, sparsity=sparsity))
    ops.append(linear("up_proj", h, inter, n, bits, bias=config.mlp_bias, count=layers, sparsity=sparsity))
    ops.append(elementwise("act_mul", n * inter, 2, 2, bits, count=layers))
    ops.append(linear("down_proj", inter, h, n, bits, bias=config.mlp_bias, count=layers, sparsity=sparsity))
    ops.append(elementwise("mlp_residual", n * h, 1, 2, bits, count=layers))
    ops.append(elementwise("norm", n * h, 7, 1, bits, weight_elements=h))
    ops.append(linear("lm_head", h, vocab, batch, bits))
    return ops
