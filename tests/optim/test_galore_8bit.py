"""Blockwise 8-bit quantization and GaLoreAdamW8bit."""

import pytest
import torch

from effllm.optim import GaLoreAdamW, GaLoreAdamW8bit, dequantize_blockwise, dynamic_code, quantize_blockwise


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_has_256_sorted_values_including_zero_and_one(signed):
    code = dynamic_code(signed)
    assert code.numel() == 256 and code.unique().numel() == 256
    assert torch.all(code[1:] > code[:-1])
    assert 0.0 in code and code.max() == 1.0
    assert (code.min() < -0.99) if signed else (code.min() == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_round_trip_error_is_at_most_half_a_code_gap_times_the_block_absmax(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.exp(2 * torch.randn(5000, generator=g))  # heavy tails
    x = x if signed else x.square()
    code, block = dynamic_code(signed), 256
    indices, absmax = quantize_blockwise(x, code, block)
    y = dequantize_blockwise(indices, absmax, code, block, x.shape)

    assert indices.dtype == torch.uint8 and absmax.numel() == -(-x.numel() // block)
    block_absmax = absmax.repeat_interleave(block)[: x.numel()]
    bound = block_absmax * (code[1:] - code[:-1]).max() / 2
    assert torch.all((x - y).abs() <= bound * (1 + 1e-5))  # equality at -absmax: the code has 1 but not -1
    assert torch.all(y[x == 0] == 0)


def test_an_outlier_costs_precision_only_in_its_own_block():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1))
    x[5] = 1e4
    code = dynamic_code(True)
    y = dequantize_blockwise(*quantize_blockwise(x, code, 256), code, 256, x.shape)
    error = (x - y).abs()
    assert error[256:].max() <= x[256:].abs().max() * 0.01
    assert error[:256].max() > 10 * error[256:].max()  # the outlier's block lost its small values


def test_8bit_galore_keeps_uint8_moments_and_tracks_32bit_galore():
    g = torch.Generator().manual_seed(2)
    w32 = torch.nn.Parameter(torch.randn(64, 48, generator=g))
    w8 = torch.nn.Parameter(w32.detach().clone())
    group = {"rank": 16, "update_proj_gap": 3, "scale": 1.0}
    opt32 = GaLoreAdamW([{"params": [w32], **group}], lr=1e-2)
    opt8 = GaLoreAdamW8bit([{"params": [w8], **group}], lr=1e-2, block_size=64, min_8bit_size=0)
    start = w32.detach().clone()
    for _ in range(6):
        grad = torch.randn(64, 48, generator=g)
        w32.grad, w8.grad = grad, grad.clone()
        opt32.step()
        opt8.step()

    state = opt8.state[w8]
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_sq_q"].dtype == torch.uint8
    assert "exp_avg" not in state
    moved32, moved8 = w32.detach() - start, w8.detach() - start
    assert torch.linalg.norm(moved8 - moved32) <= 0.05 * torch.linalg.norm(moved32)


def test_small_moments_stay_in_32_bits():
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = GaLoreAdamW8bit([w], min_8bit_size=4096)
    w.grad = torch.ones(8, 8)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.float32 and "exp_avg_q" not in opt.state[w]
