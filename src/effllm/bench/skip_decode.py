"""`effllm bench skip-decode`: SkipDecode's exit schedules against full-depth decoding, speed and quality.

Speed: batch-1 greedy decode tokens/s over `--prompts` prompts of 32 tokens from the held-out *Persuasion*
(medians; every variant runs each prompt in turn, `--reps` times), and offline throughput of
`--concurrent` requests at once. Quality: perplexity on *Persuasion* windows as SkipDecode would score
them: a window's first 32 tokens are the prompt (full depth, not scored), and the token at generated index
i is predicted from the layer the schedule gives i (the exit's logits of a dense forward are exactly what
the engine computes, since the exit never rises: `tests/engine/test_skip_decode.py`). Also the mean share
of the layers a generated token runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

from effllm.bench.shapes import add_engine_args, engine_args
from effllm.bench.spec_decode import batch1, throughput
from effllm.engine.llm_engine import make_engine
from effllm.engine.skip_decode import SkipSchedule
from effllm.eval.corpus import heldout_text
from effllm.models import load_model, load_tokenizer
from effllm.models.default import model_or_default

PROMPT_TOKENS = 32


@torch.inference_mode()
def skip_perplexity(
    model, ids: list[int], schedules: dict[str, SkipSchedule | None], windows: int, scored: int
) -> dict:
    """Per schedule (None: full depth), perplexity over `windows` windows of PROMPT_TOKENS + `scored` tokens."""
    num_layers = model.config.num_hidden_layers
    size = PROMPT_TOKENS + scored
    stride = max(size, (len(ids) - size - 1) // max(windows, 1))
    nll = {name: 0.0 for name in schedules}
    count = 0
    for w in range(windows):
        chunk = ids[w * stride : w * stride + size + 1]
        if len(chunk) < size + 1:
            break
        x = torch.tensor([chunk[:-1]])
        targets = torch.tensor(chunk[PROMPT_TOKENS:])  # token at position p + 1 for p = 31 .. size - 1
        exits = model(x, exit_layers=list(range(num_layers)))
        logp = [F.log_softmax(e[0, PROMPT_TOKENS - 1 :].float(), dim=-1) for e in exits]
        for name, schedule in schedules.items():
            for j in range(scored):
                # Row j predicts from position 31 + j: the prompt's last (full depth) or generated index j - 1.
                layer = num_layers if schedule is None or j == 0 else schedule.exit_layer(j - 1)
                nll[name] -= float(logp[layer - 1][j, targets[j]])
        count += scored
    return {name: round(math.exp(v / count), 3) for name, v in nll.items()}


def run_skip_decode(
    model_path: str | None = None,
    schedules: tuple[str, ...] = (),
    prompts: int = 4,
    new_tokens: int = 128,
    concurrent: int = 16,
    reps: int = 2,
    ppl_windows: int = 40,
    **engine_options,
) -> dict:
    path = model_or_default(model_path)
    model = load_model(path, dtype=engine_options.pop("dtype", None) or "auto", device="cpu")
    tokenizer = load_tokenizer(path)
    num_layers = model.config.num_hidden_layers
    specs = schedules or (
        f"{max(1, num_layers * 2 // 3)},{num_layers}",
        f"{max(1, num_layers // 3)},{num_layers}",
    )
    parsed = {s: SkipSchedule.parse(s, num_layers) for s in specs}
    ids = tokenizer.encode(heldout_text(), add_special_tokens=False)
    stride = len(ids) // (prompts + 1)
    batch = [ids[i * stride : i * stride + PROMPT_TOKENS] for i in range(prompts)]
    base = {"enable_prefix_caching": False, **engine_options}
    variants = {"full": base, **{f"skip_{s}": {**base, "skip_decode": s} for s in specs}}
    engines = {name: make_engine(model, **options) for name, options in variants.items()}
    r: dict = batch1(engines, batch, new_tokens, reps)
    for name in variants:
        r[name].pop("mean_accepted_length", None)
        r[name]["speedup"] = round(r[name]["decode_tokens_per_s"] / r["full"]["decode_tokens_per_s"], 3)
    for s, schedule in parsed.items():
        layers = [schedule.exit_layer(i) for i in range(new_tokens - 1)]
        r[f"skip_{s}"]["mean_layer_share"] = round(statistics.mean(layers) / num_layers, 3)
    if concurrent:
        many = (batch * -(-concurrent // len(batch)))[:concurrent]
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(reps):
            for name, options in variants.items():
                runs[name].append(throughput(model, many, new_tokens, **options)["output_tokens_per_s"])
        plain = statistics.median(runs["full"])
        r[f"throughput_{concurrent}_requests"] = {
            name: {
                "output_tokens_per_s": statistics.median(x),
                "vs_full": round(statistics.median(x) / plain, 3),
            }
            for name, x in runs.items()
        }
    fp32 = load_model(path, dtype="float32", device="cpu")
    ppl = skip_perplexity(
        fp32, ids, {"full": None, **{f"skip_{s}": p for s, p in parsed.items()}}, ppl_windows, new_tokens
    )
    for name, value in ppl.items():
        r[name]["perplexity"] = value
        r[name]["perplexity_vs_full"] = round(value / ppl["full"] - 1, 4)
    return {
        "model": str(path),
        "num_layers": num_layers,
        "new_tokens": new_tokens,
        "ppl_windows": ppl_windows,
        "threads": torch.get_num_threads(),
        "variants": r,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="checkpoint folder (default: the embedded default model)"
    )
    parser.add_argument(
        "--schedules",
        default="",
        help="semicolon-separated MIN,MAX[,SPAN] schedules (default: two, exiting at 2/3 and 1/3 of the depth)",
    )
    parser.add_argument("--prompts", type=int, default=4, help="prompts (batch 1, one after another)")
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="tokens generated (and scored) per prompt"
    )
    parser.add_argument(
        "--concurrent", type=int, default=16, help="requests at once for the throughput run (0: none)"
    )
    parser.add_argument(
        "--reps", type=int, default=2, help="interleaved repetitions of every measurement (medians)"
    )
    parser.add_argument("--ppl-windows", type=int, default=40, help="Persuasion windows for the perplexity")
    add_engine_args(parser, defaults={"enable_prefix_caching": False})
    parser.add_argument("--json", action="store_true", help="print JSON only")


def main(args: argparse.Namespace) -> int:
    options = engine_args(args)
    options.pop("skip_decode", None)  # the benchmark sets it per variant
    result = run_skip_decode(
        args.model,
        tuple(s for s in args.schedules.split(";") if s),
        args.prompts,
        args.new_tokens,
        args.concurrent,
        args.reps,
        args.ppl_windows,
        **options,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['model']}: {result['num_layers']} layers, {args.new_tokens} new tokens, {result['threads']} threads"
    )
    for name, v in result["variants"].items():
        if name.startswith("throughput"):
            for variant, t in v.items():
                print(f"  {name} {variant:14s} {t['output_tokens_per_s']:8.1f} tok/s  x{t['vs_full']:.2f}")
            continue
        share = f"  layers {v['mean_layer_share']:.0%}" if "mean_layer_share" in v else ""
        print(
            f"  {name:14s} {v['decode_tokens_per_s']:8.1f} tok/s  x{v['speedup']:.2f}  "
            f"ppl {v['perplexity']:.2f} ({v['perplexity_vs_full']:+.1%}){share}"
        )
    return 0
