"""`effllm bench latency`: time to first token (TTFT) and time per output token (TPOT).

Two scenarios, on the same weights in one process:
- batch 1: one prompt alone, effllm's engine beside transformers' `generate` (per-token timestamps);
- arrivals under load: requests arrive one every few engine steps while earlier ones decode, with
  chunked prefill on (a small token budget: a long prompt is cut into chunks that share steps with the
  decodes, SARATHI) and off (whole prompts in one step, which stalls every decode behind them). Reports
  TTFT, TPOT and the inter-token latency (ITL) the running requests see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effllm.bench.shapes import add_engine_args, add_model_args, bench_checkpoint, engine_args
from effllm.bench.throughput import random_prompts
from effllm.engine import LLM, LLMEngine, SamplingParams
from effllm.models import CausalLM, load_model


def _summary(values: list[float]) -> dict:
    values = sorted(values)

    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "mean": round(statistics.fmean(values), 5),
        "p50": round(pick(0.5), 5),
        "p90": round(pick(0.9), 5),
        "p99": round(pick(0.99), 5),
        "max": round(values[-1], 5),
    }


def _drive(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, arrival_every: int) -> dict:
    """Add prompt i at step i * arrival_every; run to the end; per request, when each token came back."""
    arrived: dict[str, float] = {}
    stamps: dict[str, list[float]] = {}
    step = 0
    while len(arrived) < len(prompts) or engine.has_unfinished_requests():
        if step % arrival_every == 0 and len(arrived) < len(prompts):
            rid = str(len(arrived))
            arrived[rid] = time.perf_counter()
            engine.add_request(rid, prompts[int(rid)], params)
        for out in engine.step():
            now = time.perf_counter()
            stamps.setdefault(out.request_id, []).extend([now] * len(out.outputs[0].delta_token_ids))
        step += 1
    return {rid: (arrived[rid], stamps[rid]) for rid in arrived}


def _latencies(runs: dict) -> dict:
    ttft = [s[0] - a for a, s in runs.values()]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for _, s in runs.values() if len(s) > 1]
    itl = [b - a for _, s in runs.values() for a, b in zip(s, s[1:], strict=False)]
    return {"ttft_s": _summary(ttft), "tpot_s": _summary(tpot), "itl_s": _summary(itl)}


def _effllm_batch1(model: CausalLM, prompt: list[int], output_tokens: int, reps: int, options: dict) -> dict:
    engine = LLM(model, **options).engine
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    _drive(engine, [prompt[:16]], SamplingParams(max_tokens=2), 1)  # warm-up
    runs = {}
    for rep in range(reps):
        # Each rep's prompt differs in its first token, so the prefix cache cannot skip its prefill.
        runs[str(rep)] = next(iter(_drive(engine, [[rep % 7, *prompt[1:]]], params, 1).values()))
    return _latencies(runs)


def _hf_batch1(hf_model, prompt: list[int], output_tokens: int, reps: int) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    def run(p: list[int], n: int) -> tuple[float, list[float]]:
        stamps: list[float] = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor([p], device=hf_model.device)
        start = time.perf_counter()
        hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([Stamp()]),
            pad_token_id=0,
        )
        return start, stamps

    with torch.inference_mode():
        run(prompt[:16], 2)
        return _latencies({str(i): run(prompt, output_tokens) for i in range(reps)})


def run_latency(
    model_path: str | None = None,
    shape: str = "smollm-135m",
    dtype: str = "float32",
    prompt_tokens: int = 512,
    output_tokens: int = 128,
    reps: int = 3,
    num_requests: int = 8,
    arrival_every: int = 8,
    concurrent_output_tokens: int = 32,
    chunk_budget: int = 128,
    peers: bool = True,
    seed: int = 0,
    **options,
) -> dict:
    """TTFT/TPOT at batch 1 (beside transformers) and under arrivals with chunked prefill on and off."""
    torch.manual_seed(seed)
    with bench_checkpoint(model_path, shape, dtype) as (model_path, label):
        model = load_model(model_path, dtype=dtype, device=options.get("device"))
        vocab = model.config.vocab_size
        prompt = random_prompts(1, prompt_tokens, prompt_tokens, vocab, seed)[0]
        result = {
            "model": label,
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "device": str(model.device),
            "batch1": {
                "prompt_tokens": prompt_tokens,
                "output_tokens": output_tokens,
                "reps": reps,
                "effllm": _effllm_batch1(model, prompt, output_tokens, reps, options),
            },
        }
        arrivals = random_prompts(num_requests, prompt_tokens, prompt_tokens, vocab, seed + 1)
        params = SamplingParams(temperature=0, max_tokens=concurrent_output_tokens, ignore_eos=True)
        under_load = {
            "num_requests": num_requests,
            "prompt_tokens": prompt_tokens,
            "arrival_every_steps": arrival_every,
            "output_tokens": concurrent_output_tokens,
        }
        for chunked in (True, False):
            opts = {**options, "enable_chunked_prefill": chunked, "enable_prefix_caching": False}
            if chunked:
                opts["max_num_batched_tokens"] = chunk_budget
            engine = LLM(model, **opts).engine
            _drive(engine, [p[:16] for p in arrivals[:2]], SamplingParams(max_tokens=2), 1)  # warm-up
            stats = _latencies(_drive(engine, arrivals, params, arrival_every))
            stats["max_num_batched_tokens"] = engine.config.max_num_batched_tokens
            under_load["chunked_prefill" if chunked else "no_chunked_prefill"] = stats
        result["under_load"] = under_load
        del model
        if peers:
            from transformers import AutoModelForCausalLM

            hf = (
                AutoModelForCausalLM.from_pretrained(
                    model_path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
                )
                .to(result["device"])
                .eval()
            )
            b1 = result["batch1"]
            b1["transformers"] = _hf_batch1(hf, prompt, output_tokens, reps)
            b1["decode_speedup_vs_transformers"] = round(
                b1["transformers"]["tpot_s"]["p50"] / b1["effllm"]["tpot_s"]["p50"], 3
            )
            b1["ttft_speedup_vs_transformers"] = round(
                b1["transformers"]["ttft_s"]["p50"] / b1["effllm"]["ttft_s"]["p50"], 3
            )
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128, help="batch-1 output tokens")
    parser.add_argument("--reps", type=int, default=3, help="batch-1 repetitions (medians reported)")
    parser.add_argument("--num-requests", type=int, default=8, help="requests arriving under load")
    parser.add_argument("--arrival-every", type=int, default=8, help="engine steps between arrivals")
    parser.add_argument("--concurrent-output-tokens", type=int, default=32)
    parser.add_argument("--chunk-budget", type=int, default=128, help="token budget with chunked prefill on")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers")
    add_engine_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_latency(
        args.model,
        args.shape,
        args.dtype,
        args.prompt_tokens,
        args.output_tokens,
        args.reps,
        args.num_requests,
        args.arrival_every,
        args.concurrent_output_tokens,
        args.chunk_budget,
        not args.no_peers,
        **engine_args(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    b1 = result["batch1"]
    print(
        f"{result['model']} {args.dtype}: batch 1, {args.prompt_tokens}-token prompt, {args.output_tokens} tokens"
    )
    for name in ("effllm", "transformers"):
        if name in b1:
            r = b1[name]
            print(
                f"  {name:13s} TTFT {r['ttft_s']['p50'] * 1e3:8.1f} ms   TPOT {r['tpot_s']['p50'] * 1e3:7.1f} ms"
            )
    load = result["under_load"]
    print(
        f"under load: {args.num_requests} requests of {args.prompt_tokens} tokens, one every {args.arrival_every} steps"
    )
    for key in ("chunked_prefill", "no_chunked_prefill"):
        r = load[key]
        print(
            f"  {key:19s} TTFT mean {r['ttft_s']['mean'] * 1e3:8.1f} ms   TPOT mean {r['tpot_s']['mean'] * 1e3:7.1f} ms"
            f"   ITL p99 {r['itl_s']['p99'] * 1e3:7.1f} ms  max {r['itl_s']['max'] * 1e3:7.1f} ms"
        )
    return 0


# The names the `effllm bench` registry asked for.
add_latency_args, main_latency = add_args, main
