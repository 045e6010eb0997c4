"""`effllm bench kv-cache`: the same long-context workload over a bfloat16, int8 and int4 KV cache of one size.

With a fixed `--kv-cache-memory`, a quantized cache holds more tokens (int4 about 3.6x bfloat16 at head_dim
64, scales included), so more sequences run at once and each decode step reads the weights for more of
them. Each variant builds a fresh engine over the same model and runs the same requests (random prompts,
EOS ignored) in one process, one after the other; reported: blocks and tokens the cache holds, the most
requests that ran in one step, preemptions, and output tokens/s, with ratios to the first variant; with
`--reps N` the variants run interleaved N times and the rates are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effllm.bench.shapes import add_engine_args, add_model_args, bench_checkpoint, engine_args
from effllm.bench.throughput import random_prompts
from effllm.engine import LLM, SamplingParams
from effllm.models import load_model


def _run(model, prompts: list[list[int]], params: SamplingParams, options: dict) -> dict:
    llm = LLM(model, **options)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    stats = llm.engine.stats
    stats.max_num_running = 0
    steps, preemptions = stats.num_steps, stats.num_preemptions
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    blocks = llm.engine.block_manager.num_blocks
    return {
        "kv_cache_blocks": blocks,
        "kv_cache_tokens": blocks * llm.engine.config.block_size,
        "max_num_running": stats.max_num_running,
        "steps": stats.num_steps - steps,
        "preemptions": stats.num_preemptions - preemptions,
        "elapsed_s": round(elapsed, 2),
        "output_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / elapsed, 2),
    }


def run_kv_cache(
    model_path: str | None = None,
    shape: str = "smollm-135m",
    dtype: str = "bfloat16",
    variants: tuple[str, ...] = ("auto", "int8", "int4"),
    num_requests: int = 24,
    input_len_min: int = 1024,
    input_len_max: int = 2048,
    output_len: int = 256,
    seed: int = 0,
    reps: int = 1,
    **engine_options,
) -> dict:
    torch.manual_seed(seed)
    engine_options.setdefault("kv_cache_memory", "160MiB")
    with bench_checkpoint(model_path, shape, dtype) as (model_path, label):
        model = load_model(model_path, dtype=dtype, device=engine_options.get("device"))
        prompts = random_prompts(num_requests, input_len_min, input_len_max, model.config.vocab_size, seed)
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(reps):  # variants interleaved, so the machine's drift falls on all of them alike
            for name in variants:
                runs[name].append(_run(model, prompts, params, {**engine_options, "kv_cache_dtype": name}))
        results = {}
        for name, rs in runs.items():
            results[name] = {
                **rs[-1],
                "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in rs),
            }
            results[name]["runs_output_tokens_per_s"] = [r["output_tokens_per_s"] for r in rs]
        first = results[variants[0]]
        for r in results.values():
            r["tokens_held_vs_first"] = round(r["kv_cache_tokens"] / first["kv_cache_tokens"], 3)
            r["throughput_vs_first"] = round(r["output_tokens_per_s"] / first["output_tokens_per_s"], 3)
    return {
        "model": label,
        "dtype": dtype,
        "kv_cache_memory": engine_options["kv_cache_memory"],
        "num_requests": num_requests,
        "input_len": [input_len_min, input_len_max],
        "output_len": output_len,
        "threads": torch.get_num_threads(),
        "variants": results,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument(
        "--variants", default="auto,int8,int4", help="comma-separated --kv-cache-dtype values (default all)"
    )
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--input-len-min", type=int, default=1024)
    parser.add_argument("--input-len-max", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--reps", type=int, default=1, help="interleaved repetitions of every variant (medians)"
    )
    add_engine_args(parser, defaults={"kv_cache_memory": "160MiB"})
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    options = engine_args(args)
    options.pop("kv_cache_dtype", None)  # the variants set it
    options.setdefault("kv_cache_memory", "160MiB")
    result = run_kv_cache(
        args.model,
        args.shape,
        args.dtype,
        tuple(v for v in args.variants.split(",") if v),
        args.num_requests,
        args.input_len_min,
        args.input_len_max,
        args.output_len,
        reps=args.reps,
        **options,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']} {args.dtype}, KV cache {result['kv_cache_memory']}: {args.num_requests} requests, "
        f"prompts {args.input_len_min}-{args.input_len_max} tokens, {args.output_len} output tokens each"
    )
    for name, r in result["variants"].items():
        print(
            f"  {name:5s} {r['kv_cache_tokens']:7d} tokens ({r['tokens_held_vs_first']:.2f}x)  "
            f"{r['max_num_running']:3d} running  {r['preemptions']:3d} preemptions  "
            f"{r['output_tokens_per_s']:7.1f} output tok/s ({r['throughput_vs_first']:.2f}x)"
        )
    return 0
