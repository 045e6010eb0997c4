"""Pruning-aware pretraining against its two baselines at equal final size and equal training tokens
(issue #17; docs/compression.md "Pruning-aware pretraining").

    python scripts/pruning_aware_experiment.py [--root runs/pruning-aware] [--steps 600] [--mlp-ratio 0.5]

All three arms start from random weights of the default model's architecture (recipes/default-model/
config.json, its tokenizer) and train on the five Austen training novels for `--steps` optimizer steps of
`--batch-size` x `--seq-len` tokens:
- `scratch`: the target size (MLP width x (1 - mlp_ratio)) trained from scratch;
- `prune-after`: the full size for (1 - recovery) of the steps, LLM-Pruner (first-order Taylor, 64 x 256
  calibration tokens) to the target size, then recovery training for the remaining steps;
- `pruning-aware`: the full size, shrunk to the target while it trains (`--method pruning-aware`).
Then each final model's per-token perplexity on the held-out *Persuasion* (all of it, float32, as
`effllm eval perplexity`). An arm whose folder already holds a model is not retrained (delete it to rerun).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from austen_experiment import CONFIG, Experiment

from effllm.compress import calibration_ids
from effllm.compress.structured import prune_structured
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.config import ModelConfig
from effllm.train.pruning_aware import parameter_count


def main() -> None:
    def more(p):
        p.add_argument("--mlp-ratio", type=float, default=0.5, help="share of MLP channels the target lacks")
        p.add_argument(
            "--recovery", type=float, default=0.2, help="prune-after: share of steps after pruning"
        )

    args, exp = Experiment.from_args(__doc__, "runs/pruning-aware", steps=600, lr=2e-3, more=more)
    root = exp.root
    full = ModelConfig.from_json_file(CONFIG)
    small = dataclasses.replace(full, intermediate_size=round(full.intermediate_size * (1 - args.mlp_ratio)))
    target = parameter_count(small)
    small_config = exp.model_config("small", intermediate_size=small.intermediate_size)

    def run(name: str, steps: int, **options) -> Path:
        return exp.run(name, steps, **{"model_config": str(CONFIG), "log_every": 20, **options})

    started = time.perf_counter()
    arms = {"scratch": run("scratch", args.steps, model_config=str(small_config))}
    arms["pruning-aware"] = run("pruning-aware", args.steps, method="pruning-aware", target_params=target)
    large_steps = round(args.steps * (1 - args.recovery))
    large = run("prune-after-large", large_steps)
    pruned = root / "prune-after-pruned"
    if not (pruned / "model.safetensors").exists():
        model = load_model(large, dtype=torch.float32, device="cpu")
        ids = calibration_ids(load_tokenizer(large), 64, 256)
        save_model(
            prune_structured(model, ids, mlp_ratio=args.mlp_ratio), pruned, tokenizer=load_tokenizer(large)
        )
    arms["prune-after"] = run(
        "prune-after",
        args.steps - large_steps,
        model=str(pruned),
        model_config=None,
        tokenizer=None,
        lr=args.lr / 2,
        warmup_steps=max(1, (args.steps - large_steps) // 20),
    )
    print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for name, folder in arms.items():
        params = sum(p.numel() for p in load_model(folder, dtype=torch.float32, device="cpu").parameters())
        ppl = exp.persuasion_perplexity(folder)
        rows.append({"arm": name, "params": params, "perplexity": round(ppl, 3)})
        print(f"{name:14s} {params:,} parameters, Persuasion perplexity {ppl:.3f}", flush=True)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"\n{tokens:,} training tokens per arm; target {target:,} parameters")
    print("| arm | parameters | Persuasion perplexity |\n|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['params']:,} | {r['perplexity']:.3f} |")
    (root / "results.json").write_text(
        json.dumps({"args": vars(args), "tokens": tokens, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
