"""How much memory a model needs to serve and to train.

Parameters and optimizer state are exact: they follow the parameter shapes (Hugging Face names) and
the state each optimizer allocates (torch.optim for AdamW and SGD, galore-torch for GaLore,
bitsandbytes' block-wise layout for 8-bit states). Activations are estimates of the tensors alive at
the peak: inference keeps one layer's temporaries; training keeps what autograd saves for backward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from effllm.core.errors import ConfigError
from effllm.models.config import ModelConfig

# bitsandbytes 8-bit optimizers: uint8 states quantized in blocks of 256 with one fp32 absmax per block;
# tensors under 4096 elements keep 32-bit states (its min_8bit_size default).
_BNB_BLOCK = 256
_BNB_MIN_8BIT_SIZE = 4096


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter by its Hugging Face name (tied lm_head counted once, as named_parameters does)."""
    h, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, out_features in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out_features, h)
            if config.qkv_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out_features,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, q_out)
        if config.o_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (h,)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            shapes[f"{p}mlp.{proj}.weight"] = shape
            if config.mlp_bias:
                shapes[f"{p}mlp.{proj}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def weight_bytes(config: ModelConfig, w_bits: float = 16) -> float:
    """Bytes of the weights: matrices at w_bits; norm weights and biases at max(w_bits, 16)."""
    small_bits = max(w_bits, 16)
    return sum(
        math.prod(s) * (w_bits if len(s) == 2 else small_bits) / 8 for s in parameter_shapes(config).values()
    )


def kv_cache_bytes(config: ModelConfig, batch: int, context: int, kv_bits: float = 16) -> float:
    """K and V of `context` tokens for `batch` sequences; a sliding-window layer keeps at most its window."""
    per_position = 2 * config.num_key_value_heads * config.head_dim * kv_bits / 8
    return (
        batch * per_position * sum(context if w is None else min(context, w) for w in config.sliding_windows)
    )


# ---------------------------------------------------------------------- inference
@dataclass(frozen=True)
class InferenceMemory:
    weights: float
    kv_cache: float
    kv_cache_per_token: float  # one more token of one sequence, all layers (window-capped layers excluded)
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def inference_memory(
    config: ModelConfig,
    batch: int = 1,
    context: int = 2048,
    w_bits: float = 16,
    a_bits: float = 16,
    kv_bits: float | None = None,
    step_tokens: int | None = None,
) -> InferenceMemory:
    """Memory to serve `batch` sequences of `context` tokens.

    Activations: the largest layer's live temporaries during a step of `step_tokens` tokens (default:
    the whole batch's prompt at once; a chunked-prefill engine passes its token budget), plus fp32
    logits of each sequence's last token.
    """
    _check(batch=batch, context=context)
    kv_bits = a_bits if kv_bits is None else kv_bits
    n = batch * context if step_tokens is None else step_tokens
    h, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    attn_live = 2 * h + 2 * q_out + 2 * kv_out  # residual, normed, q, k, v, attention output
    mlp_live = h + 3 * inter  # residual, gate, up, their product
    activations = n * max(attn_live, mlp_live) * a_bits / 8 + batch * config.vocab_size * 4
    full_layers = sum(w is None for w in config.sliding_windows)
    return InferenceMemory(
        weights=weight_bytes(config, w_bits),
        kv_cache=kv_cache_bytes(config, batch, context, kv_bits),
        kv_cache_per_token=2 * kv_out * kv_bits / 8 * full_layers,
        activations=activations,
    )


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingMemory:
    weights: float
    gradients: float
    optimizer_state: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


# Optimizers (effllm.optim's names, as `effllm train --optimizer` takes them) by the state they keep.
_ADAM_MOMENTS = ("adamw", "zo_adam")  # two parameter-sized moments
_MOMENTUM = ("sgd", "zo_sgd_momentum")  # one buffer when momentum > 0
_STATELESS = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conservative", "forward_grad_sgd")
_LOW_RANK = ("galore_adamw", "galore_adamw8bit", "natural_galore_adamw", "gradnorm_lorp_adamw")


def optimizer_state_bytes(
    config: ModelConfig,
    optimizer: str = "adamw",
    param_bits: int = 32,
    state_bits: int | None = None,
    rank: int = 128,
    options: dict[str, Any] | None = None,
) -> float:
    """Bytes the optimizer `optimizer` (a name `effllm train --optimizer` takes) allocates after its first step.

    adamw: exp_avg and exp_avg_sq per parameter, plus torch's fp32 `step` tensor per parameter tensor;
    sgd: a momentum buffer when `momentum` > 0 (options); the GaLore family (effllm.optim, integer step):
    for each attention and MLP projection the (r x min(m, n)) projector in the parameter's dtype and Adam
    moments of the (r x max(m, n)) projected gradient, full Adam moments elsewhere; galore_adamw8bit keeps
    those moments in 8 bits (blocks of `block_size` with an fp32 absmax, tensors under `min_8bit_size`
    in fp32); natural_galore_adamw adds its `history_size` projected gradients; gradnorm_lorp_adamw
    projects both sides (r x m and r x n bases, r x r moments) and keeps each row's magnitude, direction
    norm and the magnitude's moments in fp32. The zeroth-order family keeps nothing but zo_sgd_momentum's
    buffer and zo_adam's moments. state_bits=8 stores the Adam/momentum buffers as bitsandbytes does.
    """
    settings = {**optimizer_defaults(optimizer), **(options or {})}
    state_bits = param_bits if state_bits is None else state_bits
    if state_bits not in (8, 16, 32):
        raise ConfigError(f"state_bits must be 8, 16 or 32, got {state_bits}")
    if optimizer in _STATELESS:
        return 0.0
    if optimizer in _MOMENTUM:
        if not settings.get("momentum"):
            return 0.0
        return sum(_buffer_bytes(math.prod(s), state_bits) for s in parameter_shapes(config).values())
    if optimizer in _ADAM_MOMENTS:
        step = 4 if optimizer == "adamw" and state_bits != 8 else 0  # torch.optim.AdamW's float32 `step`
        return sum(
            2 * _buffer_bytes(math.prod(s), state_bits) + step for s in parameter_shapes(config).values()
        )
    if rank < 1:
        raise ConfigError(f"GaLore rank must be positive, got {rank}")
    moments = _buffer_bytes
    if optimizer == "galore_adamw8bit":
        block, smallest = settings["block_size"], settings["min_8bit_size"]

        def moments(numel: int, bits: int) -> float:
            return numel * 4 if numel < smallest else numel + 4 * math.ceil(numel / block)

    total = 0.0
    for name, shape in parameter_shapes(config).items():
        if not _is_projection(name):
            total += 2 * moments(math.prod(shape), state_bits)
            continue
        r = min(rank, *shape)
        if optimizer == "gradnorm_lorp_adamw":
            total += r * sum(shape) * param_bits / 8  # both bases
            total += 2 * moments(r * r, state_bits)
            total += 4 * shape[0] * 4  # magnitude, direction norm and the magnitude's two moments, fp32
            continue
        total += r * min(shape) * param_bits / 8  # the projector
        low_rank = r * max(shape)  # the projected gradient the Adam moments track
        total += 2 * moments(low_rank, state_bits)
        if optimizer == "natural_galore_adamw":
            total += settings["history_size"] * low_rank * param_bits / 8
    return total


def optimizer_defaults(optimizer: str) -> dict[str, Any]:
    """The registered optimizer's options; ConfigError (listing the names) for an unknown one."""
    from effllm.optim.registry import optimizer_options

    options = optimizer_options(optimizer)
    if optimizer not in _ADAM_MOMENTS + _MOMENTUM + _STATELESS + _LOW_RANK:
        raise ConfigError(f"the memory estimate does not model optimizer {optimizer!r} yet")
    return options


def keeps_gradients(optimizer: str) -> bool:
    """False for optimizers that estimate the step from forward passes alone (no backward, no gradients)."""
    from effllm.optim.registry import requires_backward_by_name

    return requires_backward_by_name(optimizer)


def _buffer_bytes(numel: int, state_bits: int) -> float:
    if state_bits != 8:
        return numel * state_bits / 8
    if numel < _BNB_MIN_8BIT_SIZE:
        return numel * 4
    return numel + 4 * math.ceil(numel / _BNB_BLOCK)


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and (".self_attn." in name or ".mlp." in name)


def training_memory(
    config: ModelConfig,
    batch: int = 1,
    seq_len: int = 2048,
    optimizer: str = "adamw",
    param_bits: int = 32,
    grad_bits: int | None = None,
    state_bits: int | None = None,
    a_bits: int | None = None,
    rank: int = 128,
    checkpointing: bool = False,
    layerwise_update: bool = False,
    options: dict[str, Any] | None = None,
) -> TrainingMemory:
    """Memory of one training step on `batch` sequences of `seq_len` tokens.

    layerwise_update frees each gradient as soon as its parameter is updated (GaLore's per-layer
    updates), so at most the largest parameter's gradient is alive. A zeroth-order optimizer keeps no
    gradients and saves no activations (two forwards, no backward).
    """
    _check(batch=batch, seq_len=seq_len)
    grad_bits = param_bits if grad_bits is None else grad_bits
    a_bits = param_bits if a_bits is None else a_bits
    sizes = [math.prod(s) for s in parameter_shapes(config).values()]
    state = optimizer_state_bytes(config, optimizer, param_bits, state_bits, rank, options)
    if not keeps_gradients(optimizer):
        gradients = 0.0
        activations = inference_memory(config, batch, seq_len, param_bits, a_bits).activations
    else:
        gradients = (max(sizes) if layerwise_update else sum(sizes)) * grad_bits / 8
        activations = _saved_activations(config, batch * seq_len, a_bits, checkpointing)
    return TrainingMemory(
        weights=sum(sizes) * param_bits / 8,
        gradients=gradients,
        optimizer_state=state,
        activations=activations,
    )


def _saved_activations(config: ModelConfig, tokens: int, a_bits: int, checkpointing: bool) -> float:
    """What autograd keeps for backward (eager PyTorch, fused attention), in bytes.

    Per layer and token: the inputs of both norms and of every projection (x, normed x, attention
    output, x after attention, its normed copy), q, k, v, and the MLP's gate, silu(gate), up and
    product; in fp32, both norms' rstd and attention's log-sum-exp per head. With checkpointing only
    each layer's input is kept, and one layer's activations are rebuilt at a time in backward.
    Logits: the activation-dtype logits and the fp32 log-softmax cross-entropy saves.
    """
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    q_out, kv_out = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = (4 * h + 2 * q_out + 2 * kv_out + 4 * inter) * a_bits / 8 + (2 + heads) * 4
    layers = config.num_hidden_layers
    head = tokens * (2 * h * a_bits / 8 + config.vocab_size * (a_bits / 8 + 4))
    if checkpointing:
        return tokens * (layers * h * a_bits / 8 + per_layer) + head
    return tokens * layers * per_layer + head


def _check(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
