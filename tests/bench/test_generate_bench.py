from effllm.bench.generate import run_generate_bench
from effllm.bench.load_memory import run_load_memory


def test_generate_bench_reports_both_engines_side_by_side():
    result = run_generate_bench(shape="tiny", prompt_tokens=16, new_tokens=4, reps=1, hardware="a100-80g")
    for name in ("effllm", "transformers"):
        assert result[name]["prefill_tokens_per_s"] > 0 and result[name]["decode_tokens_per_s"] > 0
        assert 0 < result[name]["decode_fraction_of_roofline"] < 1
    assert result["decode_speedup_vs_transformers"] > 0


def test_load_memory_bench_measures_peak_rss_over_checkpoint_size():
    result = run_load_memory("tiny")
    assert result["checkpoint_bytes"] > 0 and result["rss_peak"] >= result["rss_before_load"]
