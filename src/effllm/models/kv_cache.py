"""A contiguous KV cache: the simplest attention backend with memory of earlier tokens.

Each layer appends its new keys and values and attends over everything cached so far. One sequence
length for the whole batch; the engine's paged cache replaces this for serving.
"""

from __future__ import annotations

import torch

from effllm.core.errors import InputError
from effllm.kernels.attention import causal_window_mask, sdpa_attention


class ContiguousKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, max_len, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * num_layers

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> ContiguousKVCache:
        c = model.config
        return cls(
            c.num_hidden_layers,
            batch_size,
            max_len,
            c.num_key_value_heads,
            c.head_dim,
            model.dtype,
            model.device,
        )

    @property
    def length(self) -> int:
        """Tokens cached (after a full forward every layer holds the same number)."""
        return self.lengths[-1]

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
        start = self.lengths[layer_idx]
        end = start + k.shape[1]
        if end > self.max_len:
            raise InputError(
                f"the KV cache holds {self.max_len} tokens and {end} were asked for; allow a longer cache"
            )
        self.k[layer_idx, :, start:end] = k
        self.v[layer_idx, :, start:end] = v
        self.lengths[layer_idx] = end
        # Keys before the sliding window can never be attended again; skip them.
        first = 0 if window is None else max(0, start - window + 1)
        mask = None
        if window is not None and first > 0:
            mask = causal_window_mask(end - start, end - first, window, q.device, q_start=start - first)
        return sdpa_attention(
            q,
            self.k[layer_idx, :, first:end],
            self.v[layer_idx, :, first:end],
            scale=scale,
            window=window,
            mask=mask,
        )
