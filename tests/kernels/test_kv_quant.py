"""Quantized KV storage: the round trip's error bound, and every attention path over codes against SDPA
over the dequantized keys and values."""

import os

import pytest
import torch

from effllm.core.errors import ConfigError
from effllm.kernels import paged_attention
from effllm.kernels.attention import sdpa_attention
from effllm.kernels.cpu_paged_attention import cpu_kernel_available, paged_decode_attention_cpu, split_rows
from effllm.kernels.kv_quant import (
    bits_per_value,
    dequantize_kv,
    kv_bits,
    quantize_kv,
    round_trip,
    token_head_bytes,
)
from effllm.kernels.paged_attention import (
    paged_attention_triton,
    paged_decode_attention,
    paged_prefill_attention,
)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, 64, generator=gen) * torch.rand(500, 3, 1, generator=gen) * 10
    x[0, 0] = 2.5  # a constant vector
    codes, params = quantize_kv(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (500, 3, 64 * bits // 8)
    assert params.dtype == torch.float16 and params.shape == (500, 3, 2)
    back = dequantize_kv(codes, params, bits, torch.float32)
    step = params[..., 0].float()
    err = (back - x).abs().amax(-1)
    assert (err <= step / 2 * (1 + 1e-3) + 1e-6).all()
    assert torch.allclose(back[0, 0], x[0, 0], atol=2e-3)
    # The steps are those of the grid: (max - min) / (2^bits - 1), up to float16 rounding.
    expected = (x.amax(-1) - x.amin(-1)) / ((1 << bits) - 1)
    torch.testing.assert_close(step[1:], expected[1:], rtol=2e-3, atol=1e-6)


def test_int4_packs_the_even_channel_in_the_low_nibble():
    x = torch.tensor([[0.0, 15.0, 3.0, 0.0]])
    codes, _ = quantize_kv(x, 4)
    assert codes.tolist() == [[0xF0, 0x03]]


def test_sizes_and_names():
    assert token_head_bytes(64, None, torch.bfloat16) == 128
    assert token_head_bytes(64, 8, torch.bfloat16) == 68
    assert token_head_bytes(64, 4, torch.bfloat16) == 36
    assert bits_per_value(64, 4) == 4.5
    assert kv_bits("auto") is None and kv_bits("int4") == 4
    with pytest.raises(ConfigError, match="choose auto, int8, int4"):
        kv_bits("fp8")


def _paged(bits, seed=0, kv_heads=2, dim=64, block=4, blocks=12):
    """A quantized paged cache with random codes, and its dequantized float32 twin."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    v = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    kc, kp = quantize_kv(k, bits)
    vc, vp = quantize_kv(v, bits)
    return (kc, vc, kp, vp), (
        dequantize_kv(kc, kp, bits, torch.float32),
        dequantize_kv(vc, vp, bits, torch.float32),
    )


def _reference(q, k_deq, v_deq, table, n, window=None):
    """SDPA of one query at position n-1 over the dequantized keys of a sequence."""
    keys = k_deq[table].flatten(0, 1)[:n][None]
    values = v_deq[table].flatten(0, 1)[:n][None]
    out = sdpa_attention(q[None, None], keys, values, scale=q.shape[-1] ** -0.5, window=window)
    return out[0, 0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("compiled", [False, True])
def test_decode_over_codes_equals_sdpa_over_dequantized_values(bits, compiled):
    if compiled and not cpu_kernel_available():
        pytest.skip("no C compiler")
    (kc, vc, kp, vp), (kd, vd) = _paged(bits)
    gen = torch.Generator().manual_seed(1)
    lens = [5, 17, 9]
    tables = [[3, 7, 1, 0, 0], [2, 4, 6, 8, 10], [11, 5, 9, 0, 0]]
    q = torch.randn(3, 4, 64, generator=gen)  # 4 query heads over 2 kv heads
    expected = torch.stack([_reference(q[i], kd, vd, tables[i], lens[i]) for i in range(3)])
    quant = {"k_params": kp, "v_params": vp, "kv_bits": bits}
    if compiled:
        lo = [0, 0, 0]
        got = paged_decode_attention_cpu(
            q,
            kc,
            vc,
            torch.tensor(tables),
            torch.tensor(lens),
            torch.tensor(lo),
            split_rows(lens, lo, 2),
            64**-0.5,
            **quant,
        )
    else:
        mask = paged_attention.decode_key_mask(torch.tensor(lens), None, 5 * 4, None)
        got = paged_decode_attention(q, kc, vc, torch.tensor(tables), mask, 64**-0.5, **quant)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [64, 48])
def test_the_portable_c_path_without_avx512_agrees(bits, dim):
    """The same kernel built with -mno-avx512f (what a CPU without AVX-512 compiles), and a head_dim that
    takes the generic loops, against SDPA over the dequantized values."""
    import ctypes

    from effllm.kernels import cpu_paged_attention
    from effllm.kernels.cpu.build import DEFAULT_FLAGS, load_kernel

    lib = load_kernel(
        "paged_decode.c",
        {"paged_decode_quant": cpu_paged_attention._QUANT_SIGNATURE},
        flags=(*DEFAULT_FLAGS, "-mno-avx512f"),
    )
    if lib is None:
        pytest.skip("no C compiler")
    (kc, vc, kp, vp), (kd, vd) = _paged(bits, dim=dim)
    gen = torch.Generator().manual_seed(4)
    lens, tables = [7, 21], [[3, 7, 1, 0, 0, 0], [2, 4, 6, 8, 10, 11]]
    q = torch.randn(2, 4, dim, generator=gen)
    expected = torch.stack([_reference(q[i], kd, vd, tables[i], lens[i]) for i in range(2)])
    out = torch.empty_like(q)
    t, n, lo = torch.tensor(tables), torch.tensor(lens), torch.zeros(2, dtype=torch.long)
    ptr = lambda x: x.data_ptr()  # noqa: E731
    lib.paged_decode_quant(
        ptr(q),
        ptr(kc),
        ptr(vc),
        ptr(kp),
        ptr(vp),
        ptr(t),
        t.shape[1],
        ptr(n),
        ptr(lo),
        4,
        2,
        dim,
        4,
        ctypes.c_float(dim**-0.5),
        bits,
        0,
        2,
        ptr(out),
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_over_codes_equals_sdpa_over_dequantized_values(bits):
    (kc, vc, kp, vp), (kd, vd) = _paged(bits)
    gen = torch.Generator().manual_seed(2)
    table = torch.tensor([3, 7, 1, 5, 9])
    q_start, t = 6, 10
    q = torch.randn(t, 4, 64, generator=gen)
    keys = kd[table].flatten(0, 1)[: q_start + t][None]
    values = vd[table].flatten(0, 1)[: q_start + t][None]
    expected = sdpa_attention(q[None], keys, values, scale=64**-0.5)[0]
    got = paged_prefill_attention(
        q, kc, vc, table, q_start, None, 64**-0.5, k_params=kp, v_params=vp, kv_bits=bits
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    paged_attention.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and its interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("bits", [8, 4])
def test_the_triton_kernel_reads_codes_as_the_reference_does(bits):
    (kc, vc, kp, vp), (kd, vd) = _paged(bits, dim=32)
    gen = torch.Generator().manual_seed(3)
    tables = [[3, 7, 1, 0], [2, 4, 6, 8]]
    positions = [6, 2, 13]  # a decode of sequence 0 and two queries of sequence 1
    seq_ids = [0, 1, 1]
    q = torch.randn(3, 4, 32, generator=gen)
    expected = torch.stack([_reference(q[i], kd, vd, tables[seq_ids[i]], positions[i] + 1) for i in range(3)])
    as32 = dict(dtype=torch.int32)
    got = paged_attention_triton(
        q,
        kc,
        vc,
        torch.tensor(tables, **as32),
        torch.tensor(seq_ids, **as32),
        torch.tensor(positions, **as32),
        None,
        32**-0.5,
        k_params=kp,
        v_params=vp,
        kv_bits=bits,
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_the_dtype():
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    assert round_trip(x, 8).dtype == torch.bfloat16
