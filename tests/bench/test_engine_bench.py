"""Smoke tests of the engine benchmarks on a tiny model: every figure is there and positive."""

import argparse
import json

from effllm.bench import kv_cache, latency, quantized, skip_decode, spec_decode, structured, throughput
from effllm.models.default import default_model_path


def test_throughput_bench_reports_effllm_and_transformers_on_the_same_prompts():
    result = throughput.run_throughput(
        shape="tiny",
        num_requests=6,
        input_len_min=4,
        input_len_max=40,
        output_len=5,
        hf_batch_size=4,
        max_num_batched_tokens=32,
    )
    for name in ("effllm", "transformers"):
        assert result[name]["output_tokens"] == 6 * 5
        assert result[name]["output_tokens_per_s"] > 0 and result[name]["requests_per_s"] > 0
    assert result["effllm"]["max_num_batched_tokens"] == 32 and result["speedup_vs_transformers"] > 0


def test_kv_cache_bench_runs_each_cache_dtype_on_one_budget():
    result = kv_cache.run_kv_cache(
        shape="tiny",
        num_requests=4,
        input_len_min=20,
        input_len_max=40,
        output_len=4,
        kv_cache_memory="64KiB",
        max_num_batched_tokens=32,
    )
    v = result["variants"]
    assert v["auto"]["kv_cache_tokens"] < v["int8"]["kv_cache_tokens"] < v["int4"]["kv_cache_tokens"]
    assert v["int4"]["tokens_held_vs_first"] > 2 and all(r["output_tokens_per_s"] > 0 for r in v.values())


def test_spec_decode_bench_cli_prints_json(capsys):
    parser = argparse.ArgumentParser()
    spec_decode.add_args(parser)
    argv = ["--workloads", "free", "--k", "2", "--prompts", "1", "--new-tokens", "6", "--concurrent", "0"]
    assert spec_decode.main(parser.parse_args([*argv, "--reps", "1", "--json"])) == 0
    assert "ngram_k2" in json.loads(capsys.readouterr().out)["workloads"]["free"]


def test_spec_decode_bench_reports_speedup_and_accepted_length():
    result = spec_decode.run_spec_decode(
        workloads=("copy",), ks=(2,), prompts=1, passage_tokens=40, new_tokens=12, concurrent=2, reps=1
    )
    r = result["workloads"]["copy"]
    assert r["plain"]["decode_tokens_per_s"] > 0 and r["ngram_k2"]["speedup"] > 0
    assert r["ngram_k2"]["mean_accepted_length"] >= 1
    assert set(r["throughput_2_requests"]) == {"plain", "ngram_k2", "ngram_k2_forced"}
    assert r["ngram_k2_adaptive"]["speedup"] > 0


def test_spec_decode_bench_runs_the_draft_and_early_exit_proposers():
    """The default model drafts for itself (a draft as deep as the target: every draft accepted)."""
    result = spec_decode.run_spec_decode(
        workloads=("free",),
        ks=(2,),
        prompts=1,
        new_tokens=8,
        concurrent=0,
        reps=1,
        methods=("draft", "early-exit"),
        exit_layers=(2, 6),
        speculative_model=str(default_model_path()),
        dtype="float32",
    )
    r = result["workloads"]["free"]
    # k + 1 = 3 when every draft is accepted (a near-tie may rarely flip between batch shapes)
    assert r["draft_k2"]["mean_accepted_length"] > 2.5 and r["early-exit_E6_k2"]["mean_accepted_length"] > 2.5
    assert r["early-exit_E2_k2"]["speedup"] > 0


def test_skip_decode_bench_reports_speed_and_perplexity():
    result = skip_decode.run_skip_decode(
        schedules=("2,6,4", "6,6"), prompts=1, new_tokens=8, concurrent=2, reps=1, ppl_windows=2
    )
    v = result["variants"]
    assert v["skip_6,6"]["perplexity"] == v["full"]["perplexity"]  # full depth: the same scores
    assert v["skip_2,6,4"]["perplexity"] != v["full"]["perplexity"]
    assert v["skip_2,6,4"]["mean_layer_share"] < 1 and v["skip_2,6,4"]["decode_tokens_per_s"] > 0
    assert set(v["throughput_2_requests"]) == {"full", "skip_2,6,4", "skip_6,6"}


def test_latency_bench_reports_ttft_and_tpot_with_chunked_prefill_on_and_off():
    result = latency.run_latency(
        shape="tiny",
        prompt_tokens=24,
        output_tokens=4,
        reps=1,
        num_requests=3,
        arrival_every=2,
        concurrent_output_tokens=3,
        chunk_budget=8,
    )
    b1 = result["batch1"]
    for name in ("effllm", "transformers"):
        assert b1[name]["ttft_s"]["p50"] > 0 and b1[name]["tpot_s"]["p50"] > 0
    load = result["under_load"]
    assert load["chunked_prefill"]["max_num_batched_tokens"] == 8
    assert load["no_chunked_prefill"]["max_num_batched_tokens"] >= 24
    for key in ("chunked_prefill", "no_chunked_prefill"):
        assert load[key]["ttft_s"]["max"] > 0 and load[key]["itl_s"]["max"] > 0


def test_bench_clis_print_json(capsys):
    for module, argv in (
        (
            throughput,
            [
                "--shape",
                "tiny",
                "--num-requests",
                "2",
                "--input-len-min",
                "4",
                "--input-len-max",
                "8",
                "--output-len",
                "2",
                "--no-peers",
                "--json",
            ],
        ),
        (
            latency,
            [
                "--shape",
                "tiny",
                "--prompt-tokens",
                "8",
                "--output-tokens",
                "2",
                "--reps",
                "1",
                "--num-requests",
                "2",
                "--concurrent-output-tokens",
                "2",
                "--no-peers",
                "--json",
            ],
        ),
    ):
        parser = argparse.ArgumentParser()
        module.add_args(parser)
        assert module.main(parser.parse_args(argv)) == 0
        result = json.loads(capsys.readouterr().out)
        assert "effllm" in result.get("batch1", result)


def test_structured_bench_measures_each_constraint_against_plain():
    import pytest

    pytest.importorskip("xgrammar")
    result = structured.run_structured(None, prompts=1, new_tokens=6, concurrent=2, reps=1)
    assert set(result["batch1"]) == {"plain", "json_schema", "regex"}
    assert all(v["decode_tokens_per_s"] > 0 for v in result["batch1"].values())
    assert (
        result["batch1"]["plain"]["vs_plain"] == 1
        and result["throughput"]["regex"]["output_tokens_per_s"] > 0
    )
    assert result["mask_us_per_step_batch1"] > 0


def test_quantized_bench_runs_palettized_variants_beside_bf16():
    result = quantized.run_quantized_bench(
        shape="tiny", variants=("bf16", "pal3"), prompt_tokens=16, new_tokens=4
    )
    bf16, pal3 = result["variants"]["bf16"], result["variants"]["pal3"]
    assert pal3["streamed_bytes_per_token"] < bf16["streamed_bytes_per_token"]
    assert pal3["decode_tokens_per_s"] > 0 and "decode_speedup_vs_bf16" in pal3
