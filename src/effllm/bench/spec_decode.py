"""`effllm bench spec-decode`: speculative decoding against plain decoding, on the same model, in one run.

Workloads (prompts from the held-out *Persuasion*, tokenized by the model's tokenizer):
- `copy`: a passage of `--passage-tokens`, then its first 16 tokens again: the continuation can copy the
  passage (what continuing or editing a given text looks like);
- `free`: the first 32 tokens of a passage; the model writes on (its own text, repetitive or not).
For each workload, batch-1 greedy decode tokens/s over `--prompts` prompts (median of the prompts' rates)
for plain decoding and for each proposer of `--methods` (ngram, draft with `--speculative-model`,
early-exit at each of `--exit-layers`) at each `--k`, drafting on every step, with the mean accepted
length (tokens per verifying step), and each proposer at the middle k and the first E as the engine runs
it by default (`_adaptive`: the speculation gate drafts only while drafting is measured to pay); and
offline throughput of `--concurrent` requests at once, plain, each proposer with the engine's defaults
(the gate and the `speculative_max_running` cut-off), and forced on every step. Every variant runs each
prompt in turn, `--reps` times (interleaved, so that the machine's drift falls on all of them alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effllm.bench.shapes import add_engine_args, engine_args
from effllm.core.errors import ConfigError
from effllm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from effllm.engine.llm_engine import EngineStats, make_engine
from effllm.eval.corpus import heldout_text
from effllm.models import load_model, load_tokenizer
from effllm.models.default import model_or_default


def workload_prompts(tokenizer, name: str, count: int, passage_tokens: int) -> list[list[int]]:
    ids = tokenizer.encode(heldout_text(), add_special_tokens=False)
    stride = max(passage_tokens, len(ids) // (count + 1))
    passages = [ids[i * stride : i * stride + passage_tokens] for i in range(count)]
    if name == "copy":
        return [p + p[:16] for p in passages]
    return [p[:32] for p in passages]


def batch1(engines: dict[str, LLMEngine], prompts: list[list[int]], new_tokens: int, reps: int) -> dict:
    """Batch-1 greedy decode tokens/s per engine: every prompt run by every engine in turn, `reps` times
    (interleaved, so the machine's drift falls on all variants alike); medians and mean accepted length."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for engine in engines.values():  # warm-up (kernel loading, first-call allocations), not counted
        engine.add_request("warm-up", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            engine.step()
        engine.stats = EngineStats()
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(reps):
        for i, prompt in enumerate(prompts):
            for name, engine in engines.items():
                engine.add_request(f"b{i}", {"prompt_token_ids": prompt}, params)
                stamps = []
                while engine.has_unfinished_requests():
                    if engine.step():
                        stamps.append(time.perf_counter())
                rates[name].append((new_tokens - 1) / (stamps[-1] - stamps[0]))
    out = {}
    for name, engine in engines.items():
        stats = engine.stats
        out[name] = {
            "decode_tokens_per_s": round(statistics.median(rates[name]), 2),
            "mean_accepted_length": round(stats.mean_accepted_length, 3) or None,
        }
    return out


def throughput(model, prompts: list[list[int]], new_tokens: int, **options) -> dict:
    llm = LLM(model, **options)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return {
        "output_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / elapsed, 2),
        "mean_accepted_length": round(llm.engine.stats.mean_accepted_length, 3) or None,
    }


def spec_variants(
    methods: tuple[str, ...], ks: tuple[int, ...], exit_layers: tuple[int, ...], speculative_model: str | None
) -> dict[str, dict]:
    """Variant name -> speculative engine options: every method at every k (early exit also at every E)."""
    out: dict[str, dict] = {}
    for method in methods:
        for k in ks:
            options = {"speculative_method": method, "num_speculative_tokens": k}
            if method == "draft":
                out[f"draft_k{k}"] = {**options, "speculative_model": speculative_model}
            elif method == "early-exit":
                for e in exit_layers:
                    out[f"early-exit_E{e}_k{k}"] = {**options, "speculative_exit_layer": e}
            else:
                out[f"{method}_k{k}"] = options
    return out


def run_spec_decode(
    model_path: str | None = None,
    workloads: tuple[str, ...] = ("copy", "free"),
    ks: tuple[int, ...] = (2, 4, 6),
    prompts: int = 4,
    passage_tokens: int = 160,
    new_tokens: int = 128,
    concurrent: int = 16,
    reps: int = 2,
    methods: tuple[str, ...] = ("ngram",),
    exit_layers: tuple[int, ...] = (),
    speculative_model: str | None = None,
    **engine_options,
) -> dict:
    if "draft" in methods and not speculative_model:
        raise ConfigError("--methods draft needs --speculative-model PATH (the draft model's folder)")
    path = model_or_default(model_path)
    model = load_model(path, dtype=engine_options.pop("dtype", None) or "auto", device="cpu")
    tokenizer = load_tokenizer(path)
    base = {"enable_prefix_caching": False, **engine_options}
    layers = exit_layers or (max(1, model.config.num_hidden_layers // 2),)
    variants = spec_variants(methods, ks, layers, speculative_model)
    result = {
        "model": str(path),
        "speculative_model": speculative_model,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "workloads": {},
    }
    for name in workloads:
        batch = workload_prompts(tokenizer, name, prompts, passage_tokens)
        r: dict = {"prompt_tokens": [len(p) for p in batch]}
        k = ks[len(ks) // 2]
        middle = {  # each method at the middle k and the first E: also measured with the default gate
            v: o
            for v, o in variants.items()
            if o["num_speculative_tokens"] == k and o.get("speculative_exit_layer", layers[0]) == layers[0]
        }
        engines = {"plain": LLMEngine(model, config=EngineConfig(**base))}
        for v, options in variants.items():  # the method itself: drafting on every step
            engines[v] = make_engine(model, **base, **options, speculative_adaptive=False)
        for v, options in middle.items():  # as the engine runs by default: the gate drops what does not pay
            engines[f"{v}_adaptive"] = make_engine(model, **base, **options)
        r.update(batch1(engines, batch, new_tokens, reps))
        for v in engines:
            r[v]["speedup"] = round(r[v]["decode_tokens_per_s"] / r["plain"]["decode_tokens_per_s"], 3)
        if concurrent:
            many = (batch * -(-concurrent // len(batch)))[:concurrent]
            many_variants = {"plain": base}
            for v, options in middle.items():
                many_variants[v] = {**base, **options}
                many_variants[f"{v}_forced"] = {
                    **base,
                    **options,
                    "speculative_max_running": concurrent,
                    "speculative_adaptive": False,
                }
            runs: dict[str, list[dict]] = {v: [] for v in many_variants}
            for _ in range(reps):  # interleaved, as at batch 1
                for v, options in many_variants.items():
                    runs[v].append(throughput(model, many, new_tokens, **options))
            t = {
                v: {
                    "output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in results),
                    "mean_accepted_length": results[-1]["mean_accepted_length"],
                }
                for v, results in runs.items()
            }
            for v in t:
                t[v]["vs_plain"] = round(t[v]["output_tokens_per_s"] / t["plain"]["output_tokens_per_s"], 3)
            r[f"throughput_{concurrent}_requests"] = t
        result["workloads"][name] = r
    return result


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: the embedded default model)"
    )
    parser.add_argument("--workloads", default="copy,free", help="comma-separated: copy, free")
    parser.add_argument("--k", default="2,4,6", help="comma-separated numbers of drafts per step")
    parser.add_argument(
        "--methods", default="ngram", help="comma-separated proposers: ngram, draft, early-exit"
    )
    parser.add_argument(
        "--exit-layers",
        default="",
        help="early-exit: comma-separated draft depths E (default: half the model's layers)",
    )
    parser.add_argument(
        "--prompts", type=int, default=4, help="prompts per workload (batch 1, one after another)"
    )
    parser.add_argument("--passage-tokens", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--concurrent", type=int, default=16, help="requests at once for the throughput run (0: none)"
    )
    parser.add_argument(
        "--reps", type=int, default=2, help="interleaved repetitions of every measurement (medians)"
    )
    add_engine_args(parser, defaults={"enable_prefix_caching": False})
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    options = engine_args(args)
    for name in ("speculative_method", "num_speculative_tokens", "speculative_exit_layer"):
        options.pop(name, None)  # the benchmark sets them per variant
    result = run_spec_decode(
        args.model,
        tuple(w for w in args.workloads.split(",") if w),
        tuple(int(k) for k in args.k.split(",") if k),
        args.prompts,
        args.passage_tokens,
        args.new_tokens,
        args.concurrent,
        args.reps,
        tuple(m for m in args.methods.split(",") if m),
        tuple(int(e) for e in args.exit_layers.split(",") if e),
        options.pop("speculative_model", None),
        **options,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']}: batch-1 greedy decode, {args.new_tokens} new tokens, {result['threads']} threads"
    )
    for name, r in result["workloads"].items():
        print(f"  {name}: plain {r['plain']['decode_tokens_per_s']:.1f} tok/s")
        for key, v in r.items():
            if key.startswith(("ngram", "draft", "early-exit")):
                print(
                    f"    {key:18s} {v['decode_tokens_per_s']:8.1f} tok/s  x{v['speedup']:.2f}  "
                    f"accepted length {v['mean_accepted_length']}"
                )
            elif key.startswith("throughput"):
                for variant, t in v.items():
                    print(
                        f"    {key} {variant:26s} {t['output_tokens_per_s']:8.1f} tok/s  x{t['vs_plain']:.2f}"
                    )
    return 0
