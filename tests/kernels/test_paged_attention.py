"""Paged attention equals dense SDPA over the same keys, for decodes, prefill chunks and sliding windows."""

import os

import pytest
import torch

from effllm.kernels import paged_attention
from effllm.kernels.attention import sdpa_attention
from effllm.kernels.cpu_paged_attention import cpu_kernel_available, paged_decode_attention_cpu, split_rows
from effllm.kernels.paged_attention import (
    decode_key_mask,
    paged_attention_triton,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv,
)

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def scatter_into_pages(keys, values, num_blocks, device="cpu", dtype=torch.float32):
    """Write per-sequence keys/values [len, Hkv, D] into a shuffled paged cache; returns cache and block ids."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(device, dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for k, v in zip(keys, values, strict=True):
        blocks = [free.pop() for _ in range(-(-k.shape[0] // BLOCK))]
        slots = torch.tensor(
            [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(k.shape[0])], device=device
        )
        write_kv(k_cache, v_cache, k.to(device, dtype), v.to(device, dtype), slots)
        tables.append(blocks)
    return k_cache, v_cache, tables


def random_sequences(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in lengths]
    values = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in lengths]
    return keys, values


def compiled_decode(q, k_cache, v_cache, tables, lengths, lo, splits, scale):
    """The compiled kernel over per-sequence block lists (padded into one table), key counts and first keys."""
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return paged_decode_attention_cpu(
        q, k_cache, v_cache, padded, torch.tensor(lengths), torch.tensor(lo), splits, scale
    )


def dense(q, k, v, window):
    """Reference: the queries are the last positions of the keys."""
    return sdpa_attention(q[None], k[None], v[None], scale=DIM**-0.5, window=window)[0]


@pytest.mark.parametrize("window", [None, 3, 9])
def test_batched_decode_matches_dense_attention(window):
    lengths = [1, 4, 5, 17, 30]
    keys, values = random_sequences(lengths)
    k_cache, v_cache, tables = scatter_into_pages(keys, values, num_blocks=40)
    q = torch.randn(len(lengths), HEADS, DIM)
    bs = BLOCK
    firsts = [0 if window is None else max(0, n - window) // bs for n in lengths]
    rows = [t[f : -(-n // bs)] for t, f, n in zip(tables, firsts, lengths, strict=True)]
    width = max(map(len, rows))
    block_tables = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = decode_key_mask(torch.tensor(lengths), torch.tensor(firsts) * bs, width * bs, window)
    got = paged_decode_attention(q, k_cache, v_cache, block_tables, mask, DIM**-0.5)
    for i in range(len(lengths)):
        expected = dense(q[i : i + 1], keys[i], values[i], window)
        torch.testing.assert_close(got[i : i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("q_start", "q_len"), [(0, 9), (7, 1), (8, 8), (13, 20)])
def test_prefill_chunk_matches_dense_attention(window, q_start, q_len):
    keys, values = random_sequences([q_start + q_len])
    k_cache, v_cache, tables = scatter_into_pages(keys, values, num_blocks=20)
    q = torch.randn(q_len, HEADS, DIM)
    got = paged_prefill_attention(q, k_cache, v_cache, torch.tensor(tables[0]), q_start, window, DIM**-0.5)
    expected = dense(q, keys[0], values[0], window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


TRITON_DEVICES = [
    pytest.param("cuda", marks=pytest.mark.cuda),
    # Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            paged_attention.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
            reason="needs triton and TRITON_INTERPRET=1",
        ),
    ),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_dense_attention_on_a_mixed_step(window, dtype, device):
    # Three sequences: a decode at 30 keys, a chunk of 5 after 11 cached keys, a fresh prompt of 7.
    lengths, chunks = [30, 16, 7], [1, 5, 7]
    keys, values = random_sequences(lengths)
    k_cache, v_cache, tables = scatter_into_pages(keys, values, num_blocks=40, device=device, dtype=dtype)
    width = max(map(len, tables))
    block_tables = torch.tensor(
        [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
    )
    seq_ids = torch.tensor(
        [i for i, c in enumerate(chunks) for _ in range(c)], dtype=torch.int32, device=device
    )
    positions = torch.tensor(
        [p for n, c in zip(lengths, chunks, strict=True) for p in range(n - c, n)],
        dtype=torch.int32,
        device=device,
    )
    q = torch.randn(sum(chunks), HEADS, DIM, device=device, dtype=dtype)
    got = paged_attention_triton(q, k_cache, v_cache, block_tables, seq_ids, positions, window, DIM**-0.5)
    start = 0
    for c, k, v in zip(chunks, keys, values, strict=True):
        k, v = (x.to(device, dtype).float() for x in (k, v))  # the cache's rounding, fp32 arithmetic
        expected = dense(q[start : start + c].float(), k, v, window)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got[start : start + c].float(), expected, atol=tol, rtol=tol)
        start += c


@pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler for the CPU kernel")
@pytest.mark.parametrize("window", [None, 3, 9])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_decode_matches_dense_attention(window, heads, kv_heads, threads, dtype):
    lengths = [1, 4, 5, 17, 30, 2]
    gen = torch.Generator().manual_seed(2)
    # The reference sees the cache's rounding (bf16 keys and values), in float32 arithmetic.
    keys = [torch.randn(n, kv_heads, DIM, generator=gen).to(dtype).float() for n in lengths]
    values = [torch.randn(n, kv_heads, DIM, generator=gen).to(dtype).float() for n in lengths]
    k_cache = torch.zeros(40, BLOCK, kv_heads, DIM, dtype=dtype)
    v_cache = torch.zeros(40, BLOCK, kv_heads, DIM, dtype=dtype)
    free = torch.randperm(40, generator=gen).tolist()
    tables = []
    for k, v in zip(keys, values, strict=True):
        blocks = [free.pop() for _ in range(-(-k.shape[0] // BLOCK))]
        write_kv(
            k_cache,
            v_cache,
            k.to(dtype),
            v.to(dtype),
            torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(len(k))]),
        )
        tables.append(blocks)
    lo = [0 if window is None else max(0, n - window) for n in lengths]
    q = torch.randn(len(lengths), heads, DIM, generator=gen).to(dtype)
    got = compiled_decode(
        q, k_cache, v_cache, tables, lengths, lo, split_rows(lengths, lo, threads), DIM**-0.5
    )
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    for i in range(len(lengths)):
        expected = dense(q[i : i + 1].float(), keys[i], values[i], window)
        torch.testing.assert_close(got[i : i + 1].float(), expected, atol=tol, rtol=tol)


def test_split_rows_balances_keys_and_covers_every_row():
    assert split_rows([10, 10, 10, 10], [0, 0, 0, 0], 2) == [(0, 2), (2, 4)]
    assert split_rows([100, 1, 1, 1], [0, 0, 0, 0], 2) == [(0, 1), (1, 4)]
    assert split_rows([5], [0], 4) == [(0, 1)]


@pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler")
@pytest.mark.parametrize("block", [16, 32, 8])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (16, 1)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("threads", [1, 3])
def test_compiled_cpu_decode_at_model_head_dims(block, heads, kv_heads, dim, threads):
    """Head dims of real models (64, 128), where a bfloat16 cache takes the vdpbf16ps or AMX scores: shares
    that start and end inside blocks, full and partial 16-token tiles, blocks of 16, 32 and 8 tokens (8:
    no 16 consecutive rows, the copied tile), shuffled blocks."""
    from effllm.kernels.cpu.build import cpu_features
    from effllm.kernels.cpu_paged_attention import amx_scores_available

    if {"amx_tile", "amx_bf16"} <= cpu_features():
        assert amx_scores_available()  # this test then exercises the AMX path
    lengths, dtype = [1, 15, 16, 17, 47, 300], torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(n, kv_heads, dim, generator=gen).to(dtype) for n in lengths]
    values = [torch.randn(n, kv_heads, dim, generator=gen).to(dtype) for n in lengths]
    num_blocks = sum(-(-n // block) for n in lengths) + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for k, v in zip(keys, values, strict=True):
        blocks = [free.pop() for _ in range(-(-k.shape[0] // block))]
        slots = torch.tensor([blocks[p // block] * block + p % block for p in range(len(k))])
        k_cache.view(-1, kv_heads, dim)[slots] = k
        v_cache.view(-1, kv_heads, dim)[slots] = v
        tables.append(blocks)
    lo = [0, 0, 3, 0, 10, 0]  # some rows start past position 0 (a sliding window)
    q = torch.randn(len(lengths), heads, dim, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = compiled_decode(q, k_cache, v_cache, tables, lengths, lo, [], dim**-0.5)
    finally:
        torch.set_num_threads(before)
    for i in range(len(lengths)):
        # the kernel rounds the queries to bfloat16 for its bfloat16 dot products; so does the reference
        expected = sdpa_attention(
            q[i : i + 1, None].to(dtype).float(),
            keys[i][None, lo[i] :].float(),
            values[i][None, lo[i] :].float(),
            scale=dim**-0.5,
        )[0, 0]
        torch.testing.assert_close(got[i].float(), expected, atol=2e-5, rtol=1e-4)
