"""Dense attention: the reference every other attention backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_window_mask(
    q_len: int, kv_len: int, window: int | None, device: torch.device, q_start: int | None = None
) -> torch.Tensor:
    """Boolean mask [q_len, kv_len], True where query i may attend key j.

    Queries sit at absolute positions q_start .. q_start+q_len-1 (by default the last q_len of the keys).
    A key is visible when it is not in the future and, with a sliding window w, when it is one of the
    w most recent positions (j > i - w), as Mistral and Qwen2 define it.
    """
    if q_start is None:
        q_start = kv_len - q_len
    qpos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention through `F.scaled_dot_product_attention`.

    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D] with H a multiple of Hkv. The queries are the last Tq
    positions of the keys (Tq == Tk for a plain forward, Tq < Tk when earlier keys come from a cache).
    `mask` ([Tq, Tk] or broadcastable, True = attend) overrides the causal/window mask.
    Returns [B, Tq, H, D].
    """
    q_len, kv_len = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    full = window is None or window >= kv_len
    if mask is None and full and q_len == kv_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    elif mask is None and full and q_len == 1:  # one query at the end sees every key
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=gqa)
    else:
        if mask is None:
            mask = causal_window_mask(q_len, kv_len, window, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
