import argparse
import json

from effllm.bench import train as bench
from effllm.models import ModelConfig


def test_train_bench_reports_throughput_memory_and_mfu():
    config = ModelConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    result = bench.run_train_bench(
        config=config, batch_size=2, seq_len=16, steps=2, warmup=1, peak_tflops=1.0
    )
    assert result["shape"] == "custom" and result["params"] == config.num_parameters()
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["peak_memory_bytes"] > 0


def test_train_bench_command_prints_json(capsys):
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    args = parser.parse_args(
        ["--shape", "tiny", "--steps", "1", "--warmup", "0", "--seq-len", "8", "--batch-size", "1", "--json"]
    )
    assert bench.main(args) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == "tiny"
