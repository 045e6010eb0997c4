"""`effllm bench structured`: what structured outputs cost the engine, per constraint.

Each variant decodes the same prompts from the held-out *Persuasion* with the same engine options: `plain`
(no constraint, EOS ignored), `json_schema` (an array of at least 64 `{"name": string, "age": integer}`
objects, long enough never to end before `--new-tokens`) and `regex` (words until a full stop; the default model rarely writes one within `--new-tokens`).
Batch 1: greedy decode tokens/s, every prompt by every variant in turn, `--reps` times (medians).
Throughput: `--concurrent` requests at once, output tokens/s. Also the time spent filling and applying
the token masks per constrained step (the constraint's own overhead, part of the step time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from effllm.bench.shapes import add_engine_args, engine_args
from effllm.engine import SamplingParams
from effllm.engine.llm_engine import make_engine
from effllm.eval.corpus import heldout_text
from effllm.models import load_tokenizer
from effllm.models.default import model_or_default

SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}
VARIANTS = {
    "plain": None,
    "json_schema": {"json_schema": SCHEMA},
    # Words until a full stop. (A counted repetition such as {160,} to force the length would measure
    # xgrammar's cost for large automata instead: about 30 ms per mask at {160,} here.)
    "regex": {"regex": r"[A-Z][a-z]+( [a-z]+[,;]?)+\."},
}


def _params(variant: str, new_tokens: int) -> SamplingParams:
    structured = VARIANTS[variant]
    return SamplingParams(
        temperature=0, max_tokens=new_tokens, ignore_eos=structured is None, structured=structured
    )


class _MaskTimer:
    """Wraps an engine's mask_logits: total seconds and calls."""

    def __init__(self, manager):
        self.inner, self.seconds, self.calls = manager.mask_logits, 0.0, 0
        manager.mask_logits = self

    def __call__(self, logits, requests):
        start = time.perf_counter()
        out = self.inner(logits, requests)
        if any(r.grammar is not None for r in requests):
            self.seconds += time.perf_counter() - start
            self.calls += 1
        return out


def run_structured(model, prompts: int, new_tokens: int, concurrent: int, reps: int, **options) -> dict:
    path = model_or_default(model)
    tokenizer = load_tokenizer(path)
    text = heldout_text()
    ids = tokenizer.encode(text[:200_000])
    starts = range(0, len(ids) - 64, max(1, (len(ids) - 64) // max(prompts, concurrent, 1)))
    windows = [ids[s : s + 32] for s in starts]
    engine = make_engine(path, **options)
    timer = _MaskTimer(engine.structured)
    for variant in VARIANTS:  # warm-up: kernels and grammar compilation, not counted
        engine.add_request(f"warm-{variant}", {"prompt_token_ids": windows[0]}, _params(variant, 8))
    while engine.has_unfinished_requests():
        engine.step()
    timer.seconds, timer.calls = 0.0, 0
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(reps):
        for i, prompt in enumerate(windows[:prompts]):
            for variant in VARIANTS:
                engine.add_request(
                    f"{variant}-{i}", {"prompt_token_ids": prompt}, _params(variant, new_tokens)
                )
                stamps = []
                while engine.has_unfinished_requests():
                    if engine.step():
                        stamps.append(time.perf_counter())
                rates[variant].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    mask_us = 1e6 * timer.seconds / max(timer.calls, 1)
    out = {
        "model": str(path),
        "threads": torch.get_num_threads(),
        "mask_us_per_step_batch1": round(mask_us, 1),
    }
    plain = statistics.median(rates["plain"])
    out["batch1"] = {
        v: {
            "decode_tokens_per_s": round(statistics.median(r), 2),
            "vs_plain": round(statistics.median(r) / plain, 3),
        }
        for v, r in rates.items()
    }
    if concurrent:
        out["throughput"] = {}
        timer.seconds, timer.calls = 0.0, 0
        for variant in VARIANTS:
            start = time.perf_counter()
            for i, prompt in enumerate(windows[:concurrent]):
                engine.add_request(
                    f"t-{variant}-{i}", {"prompt_token_ids": prompt}, _params(variant, new_tokens)
                )
            produced = 0
            while engine.has_unfinished_requests():
                produced += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
            out["throughput"][variant] = {
                "output_tokens_per_s": round(produced / (time.perf_counter() - start), 2)
            }
        base = out["throughput"]["plain"]["output_tokens_per_s"]
        for v in out["throughput"].values():
            v["vs_plain"] = round(v["output_tokens_per_s"] / base, 3)
        out[f"mask_us_per_step_batch{concurrent}"] = round(1e6 * timer.seconds / max(timer.calls, 1), 1)
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: the embedded default model)"
    )
    parser.add_argument("--prompts", type=int, default=4, help="prompts (batch 1, one after another)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument(
        "--concurrent", type=int, default=16, help="requests at once for the throughput run (0: none)"
    )
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions (medians)")
    add_engine_args(parser, defaults={"enable_prefix_caching": False})
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    result = run_structured(
        args.model, args.prompts, args.new_tokens, args.concurrent, args.reps, **engine_args(args)
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: {args.new_tokens} new tokens, {result['threads']} threads")
    for v, r in result["batch1"].items():
        print(f"  batch 1   {v:12s} {r['decode_tokens_per_s']:8.1f} tok/s  x{r['vs_plain']:.3f}")
    for v, r in result.get("throughput", {}).items():
        print(
            f"  {args.concurrent:2d} at once {v:12s} {r['output_tokens_per_s']:8.1f} tok/s  x{r['vs_plain']:.3f}"
        )
    print(f"  mask fill + apply per constrained step: {result['mask_us_per_step_batch1']:.0f} us at batch 1")
    return 0
