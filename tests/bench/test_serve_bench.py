import math

import pytest

from effllm.bench.serve import RequestResult, run_serve_bench, summarize
from effllm.cli.init_model import init_model
from effllm.core.errors import InputError


def test_summary_uses_vllm_definitions():
    results = [
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestResult(ok=True, prompt_tokens=10, output_tokens=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        RequestResult(error="HTTP 429"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"HTTP 429": 1})
    assert (
        s["request_throughput"] == 1.0
        and s["output_throughput"] == 4.0
        and s["total_token_throughput"] == 14.0
    )
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_e2el_ms"] == pytest.approx(600)
    assert s["mean_tpot_ms"] == pytest.approx(150)  # (0.4 / 4 + 0.4 / 2) / 2
    assert s["median_itl_ms"] == pytest.approx(100) and s["p99_itl_ms"] == pytest.approx(200)


def test_serve_bench_loads_a_launched_server_at_each_rate(tmp_path):
    model = str(init_model(tmp_path / "tiny"))
    result = run_serve_bench(
        model=model,
        request_rates=[math.inf, 40.0],
        max_concurrency=4,
        num_prompts=8,
        input_len=16,
        output_len=6,
        server_args=["--num-kv-blocks", "64", "--device", "cpu"],
        timeout=120,
    )
    assert result["prompt_kind"] == "token_ids" and result["server"]["launched"]
    assert [r["request_rate"] for r in result["results"]] == ["inf", 40.0]
    for run in result["results"]:
        assert (run["completed"], run["failed"]) == (8, 0)
        assert (run["total_input_tokens"], run["total_output_tokens"]) == (8 * 16, 8 * 6)
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < run[f"median_{name}_ms"] <= run[f"p99_{name}_ms"]
        assert run["mean_ttft_ms"] < run["mean_e2el_ms"]


def test_serve_bench_rejects_bad_settings():
    with pytest.raises(InputError):
        run_serve_bench("http://127.0.0.1:9", request_rates=[0])
