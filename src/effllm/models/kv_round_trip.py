"""The quantized KV cache's numerics in a plain forward: keys and values quantized and dequantized per token
and head (`kernels/kv_quant.py`) before causal attention, exactly what the engine's int8/int4 cache gives
back. Per-token quantization does not depend on other tokens, so a full forward with this backend scores
a text as the engine would decode it: `effllm eval perplexity --kv-cache-dtype int4` uses it, and the
engine's tests compare against it.

    logits = model(ids, attn=KVRoundTrip(4))
    model_view = with_kv_round_trip(model, 4)  # hidden_states/logits/forward with the round trip
"""

from __future__ import annotations

import torch

from effllm.kernels.attention import sdpa_attention
from effllm.kernels.kv_quant import round_trip


class KVRoundTrip:
    """An attention backend: causal attention over the new tokens' round-tripped keys and values."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        k, v = round_trip(k, self.bits), round_trip(v, self.bits)
        return sdpa_attention(q, k, v, scale=scale, window=window)


class with_kv_round_trip:  # noqa: N801 - reads as a function at the call site
    """`model` seen through `KVRoundTrip(bits)`: the CausalLM interface eval uses (config, device, dtype,
    hidden_states, logits, forward), every attention layer round-tripping its keys and values."""

    def __init__(self, model, bits: int):
        self.model, self.attn = model, KVRoundTrip(bits)
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.hidden_states(input_ids, positions, self.attn)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, self.attn)
