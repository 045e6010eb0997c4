"""Attention over a paged KV cache: keys and values live in fixed-size blocks scattered in one tensor.

Cache layout per layer: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim]. Token position p
of a sequence lives in block `block_ids[p // block_size]`, slot `p % block_size`; a flat slot index is
`block * block_size + offset`. Query heads map onto kv heads as in transformers' `repeat_kv`: head h
reads kv head h // (heads // kv_heads).

Two implementations:
- pure PyTorch (CPU, and the reference): gather a sequence's blocks, then `scaled_dot_product_attention`.
  Decodes are batched into one call; their query heads are folded into the query length, so GQA needs
  no repeated keys and the only mask is the per-sequence key length.
- a Triton kernel (CUDA): one program per (query token, kv head) walks the sequence's blocks with an
  online softmax, reading each key once and gathering nothing. It serves prefill chunks and decodes
  alike and has static shapes for a given batch, so decode steps can be captured in CUDA graphs.
All are tested against dense `sdpa_attention` on the same keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effllm.kernels.attention import causal_window_mask, sdpa_attention

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys and values k, v [tokens, kv_heads, head_dim] at flat slots slot_mapping [tokens]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, D], block_tables [..., blocks] -> [..., blocks * block_size, kv_heads, D]."""
    # index_select on rows of whole blocks: one memcpy per block (advanced indexing is far slower on CPU).
    rows = cache.view(cache.shape[0], -1).index_select(0, block_tables.reshape(-1))
    return rows.view(*block_tables.shape[:-1], -1, *cache.shape[2:])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, at the end of its keys.

    q: [B, H, D]; block_tables: [B, blocks] (rows padded with any valid block id);
    key_mask: [B, 1, 1, blocks * block_size], True where the key is visible (None = all are).
    Returns [B, H, D].
    """
    b, h, d = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_kv(k_cache, block_tables).transpose(1, 2)  # [B, kv_heads, keys, D]
    v = gather_kv(v_cache, block_tables).transpose(1, 2)
    # The G query heads sharing a kv head become G queries of one head: no repeat of k and v.
    out = F.scaled_dot_product_attention(
        q.view(b, kv_heads, h // kv_heads, d), k, v, attn_mask=key_mask, scale=scale
    )
    return out.reshape(b, h, d)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    q_start: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """A chunk of one sequence's queries at positions q_start .. q_start+T-1 over its cached keys.

    q: [T, H, D]; block_ids: [blocks] covering positions 0 .. q_start+T-1. Returns [T, H, D].
    """
    t = q.shape[0]
    kv_len = q_start + t
    first = (
        0 if window is None else max(0, q_start - window + 1) // k_cache.shape[1]
    )  # first block in the window
    k = gather_kv(k_cache, block_ids[first:])[None, : kv_len - first * k_cache.shape[1]]
    v = gather_kv(v_cache, block_ids[first:])[None, : kv_len - first * k_cache.shape[1]]
    offset = first * k_cache.shape[1]
    mask = causal_window_mask(t, kv_len - offset, window, q.device, q_start=q_start - offset)
    return sdpa_attention(q[None], k, v, scale=scale, mask=mask)[0]


def decode_key_mask(
    context_lens: torch.Tensor, first_positions: torch.Tensor | None, num_keys: int, window: int | None
) -> torch.Tensor:
    """Key mask [B, 1, 1, num_keys] for `paged_decode_attention`.

    Gathered key j of row i sits at absolute position first_positions[i] + j (0 when None); the query is
    at context_lens[i] - 1 and sees keys in (query - window, query].
    """
    pos = torch.arange(num_keys, device=context_lens.device)[None, :]
    if first_positions is not None:
        pos = pos + first_positions[:, None]
    query = context_lens[:, None] - 1
    mask = pos <= query
    if window is not None:
        mask &= pos > query - window
    return mask[:, None, None, :]


# ---------------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q,
        K,
        V,
        Out,
        BLOCK_TABLES,
        SEQ_IDS,
        POSITIONS,
        scale,
        window,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_bt,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(SEQ_IDS + token).to(tl.int64)
        pos = tl.load(POSITIONS + token)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        s = tl.arange(0, BLOCK_SIZE)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(
            Q + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [GROUP_PAD, DIM_PAD]
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        lo = tl.maximum(pos - window + 1, 0)
        # Every visited block holds at least one visible key, so the running max stays finite.
        for blk in range(lo // BLOCK_SIZE, pos // BLOCK_SIZE + 1):
            block = tl.load(BLOCK_TABLES + seq * stride_bt + blk).to(tl.int64)
            key_pos = blk * BLOCK_SIZE + s
            visible = (key_pos <= pos) & (key_pos >= lo)
            kv_mask = visible[:, None] & d_ok[None, :]
            k = tl.load(
                K + block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)  # [BLOCK_SIZE, DIM_PAD]
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(
                V + block * stride_vb + s[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(
            Out + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Varlen paged attention on CUDA: any mix of prefill chunks and decodes in one launch.

    q: [T, H, D] (the step's flattened queries, already written to the cache with `write_kv`);
    block_tables: [seqs, max_blocks] int32; seq_ids, positions: [T] int32, the row of block_tables
    and the absolute position of each query. Query t sees keys at positions (pos - window, pos].
    Returns [T, H, D].
    """
    if triton is None:
        raise RuntimeError("paged_attention_triton needs Triton (a CUDA build of PyTorch)")
    t, h, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = h // kv_heads
    out = torch.empty_like(q)
    _paged_attention_kernel[(t, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_ids,
        positions,
        scale,
        window if window is not None else 1 << 30,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=d,
        DIM_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size,
    )
    return out
