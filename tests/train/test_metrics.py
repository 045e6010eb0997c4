import torch

from effllm.models import CausalLM, ModelConfig
from effllm.train.metrics import _cpu_peak_tflops, flops_per_token


def test_flops_per_token_is_six_n_plus_attention():
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=False,
    )
    n = sum(p.numel() for p in CausalLM(config).parameters()) - 64 * 32
    assert flops_per_token(config, seq_len=10) == 6 * n + 12 * 2 * 4 * 8 * 10


def test_cpu_bf16_peak_is_not_below_fp32_peak():
    fp32, bf16 = _cpu_peak_tflops("fp32"), _cpu_peak_tflops("bf16")
    if fp32 is None:
        return
    assert bf16 >= fp32 > 0
    assert fp32 <= torch.get_num_threads() * 10.0  # 10 TFLOP/s per core would be a misread clock
