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
from effllm.kernels.kv_quant import dequantize_kv

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


def gather_values(
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    params: torch.Tensor | None = None,
    bits: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`gather_kv`, dequantized to `dtype` when the cache holds int8/int4 codes with their `params`
    (`kernels/kv_quant.py`)."""
    values = gather_kv(cache, block_tables)
    if bits is None:
        return values
    return dequantize_kv(values, gather_kv(params, block_tables), bits, dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    kv_bits: int | None = None,
) -> torch.Tensor:
    """One query per sequence, at the end of its keys.

    q: [B, H, D]; block_tables: [B, blocks] (rows padded with any valid block id);
    key_mask: [B, 1, 1, blocks * block_size], True where the key is visible (None = all are).
    A quantized cache (codes) passes its `k_params`, `v_params` and `kv_bits`. Returns [B, H, D].
    """
    b, h, d = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_values(k_cache, block_tables, k_params, kv_bits, q.dtype).transpose(
        1, 2
    )  # [B, kv_heads, keys, D]
    v = gather_values(v_cache, block_tables, v_params, kv_bits, q.dtype).transpose(1, 2)
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
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    kv_bits: int | None = None,
) -> torch.Tensor:
    """A chunk of one sequence's queries at positions q_start .. q_start+T-1 over its cached keys.

    q: [T, H, D]; block_ids: [blocks] covering positions 0 .. q_start+T-1; a quantized cache passes its
    params and bits as `paged_decode_attention` does. Returns [T, H, D].
    """
    t = q.shape[0]
    kv_len = q_start + t
    first = (
        0 if window is None else max(0, q_start - window + 1) // k_cache.shape[1]
    )  # first block in the window
    keep = kv_len - first * k_cache.shape[1]
    k = gather_values(k_cache, block_ids[first:], k_params, kv_bits, q.dtype)[None, :keep]
    v = gather_values(v_cache, block_ids[first:], v_params, kv_bits, q.dtype)[None, :keep]
    if q_start == 0 and (window is None or window >= kv_len):
        # the whole prompt in one chunk: plain causal attention, which SDPA's flash kernel computes without
        # the blocks above the diagonal (an explicit mask makes it compute them and mask them out)
        return sdpa_attention(q[None], k, v, scale=scale)[0]
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
    def _load_kv(
        C,
        P,
        block,
        s,
        kv_head,
        d,
        kv_mask,
        visible,
        stride_b,
        stride_s,
        stride_h,
        stride_pb,
        stride_ps,
        stride_ph,
        KV_BITS: tl.constexpr,
    ):
        """One block's keys or values [BLOCK_SIZE, DIM_PAD] as float32: stored as they are (KV_BITS 16), or
        int8/int4 codes dequantized with their float16 step and minimum (kernels/kv_quant.py)."""
        row = C + block * stride_b + s[:, None] * stride_s + kv_head * stride_h
        if KV_BITS == 16:
            return tl.load(row + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        if KV_BITS == 8:
            codes = tl.load(row + d[None, :], mask=kv_mask, other=0).to(tl.float32)
        else:
            packed = tl.load(row + (d // 2)[None, :], mask=kv_mask, other=0)
            codes = ((packed >> ((d % 2) * 4).to(tl.uint8)[None, :]) & 15).to(tl.float32)
        params = P + block * stride_pb + s * stride_ps + kv_head * stride_ph
        step = tl.load(params, mask=visible, other=0.0).to(tl.float32)
        low = tl.load(params + 1, mask=visible, other=0.0).to(tl.float32)
        return codes * step[:, None] + low[:, None]

    @triton.jit
    def _paged_attention_kernel(
        Q,
        K,
        V,
        KP,
        VP,
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
        stride_pb,
        stride_ps,
        stride_ph,
        KV_BITS: tl.constexpr,
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
            k = _load_kv(
                K,
                KP,
                block,
                s,
                kv_head,
                d,
                kv_mask,
                visible,
                stride_kb,
                stride_ks,
                stride_kh,
                stride_pb,
                stride_ps,
                stride_ph,
                KV_BITS,
            )  # [BLOCK_SIZE, DIM_PAD] float32
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = _load_kv(
                V,
                VP,
                block,
                s,
                kv_head,
                d,
                kv_mask,
                visible,
                stride_vb,
                stride_vs,
                stride_vh,
                stride_pb,
                stride_ps,
                stride_ph,
                KV_BITS,
            )
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
    k_params: torch.Tensor | None = None,
    v_params: torch.Tensor | None = None,
    kv_bits: int | None = None,
) -> torch.Tensor:
    """Varlen paged attention on CUDA: any mix of prefill chunks and decodes in one launch.

    q: [T, H, D] (the step's flattened queries, already written to the cache with `write_kv`);
    block_tables: [seqs, max_blocks] int32; seq_ids, positions: [T] int32, the row of block_tables
    and the absolute position of each query. Query t sees keys at positions (pos - window, pos].
    An int8/int4 cache passes its codes as k_cache, v_cache with `k_params`, `v_params` and `kv_bits`.
    Returns [T, H, D].
    """
    if triton is None:
        raise RuntimeError("paged_attention_triton needs Triton (a CUDA build of PyTorch)")
    t, h, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = h // kv_heads
    out = torch.empty_like(q)
    if kv_bits is None:
        k_params = v_params = k_cache  # unread
    _paged_attention_kernel[(t, kv_heads)](
        q,
        k_cache,
        v_cache,
        k_params,
        v_params,
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
        k_params.stride(0),
        k_params.stride(1),
        k_params.stride(2),
        KV_BITS=16 if kv_bits is None else kv_bits,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=d,
        DIM_PAD=triton.next_power_of_2(d),
        BLOCK_SIZE=block_size,
    )
    return out
