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

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from effllm.compress import calibration_ids
from effllm.compress.structured import prune_structured
from effllm.eval.corpus import heldout_text, training_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.config import ModelConfig
from effllm.models.default import default_model_path
from effllm.train import TrainConfig, train
from effllm.train.pruning_aware import parameter_count

CONFIG = Path("recipes/default-model/config.json")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="runs/pruning-aware")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mlp-ratio", type=float, default=0.5, help="share of MLP channels the target lacks")
    parser.add_argument(
        "--recovery", type=float, default=0.2, help="prune-after: share of steps after pruning"
    )
    args = parser.parse_args()
    root = Path(args.root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    data = root / "data" / "austen.txt"
    if not data.exists():
        data.write_text(training_text())
    tokenizer_dir = default_model_path()
    full = ModelConfig.from_json_file(CONFIG)
    small = dataclasses.replace(full, intermediate_size=round(full.intermediate_size * (1 - args.mlp_ratio)))
    target = parameter_count(small)
    small_config = root / "data" / "small-config.json"
    config_json = json.loads(CONFIG.read_text()) | {"intermediate_size": small.intermediate_size}
    small_config.write_text(json.dumps(config_json, indent=2))

    def run(name: str, steps: int, **options) -> Path:
        out = root / name
        if (out / "model.safetensors").exists():
            print(f"{name}: already trained, kept", flush=True)
            return out
        values = dict(
            model_config=str(CONFIG),
            tokenizer=str(tokenizer_dir),
            data=[str(data)],
            out=str(out),
            steps=steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            optimizer="adamw",
            optimizer_options={"betas": [0.9, 0.95]},
            lr=args.lr,
            weight_decay=0.1,
            warmup_steps=max(1, steps // 20),
            schedule="cosine",
            precision="bf16",
            eval_fraction=0.02,
            eval_every=100,
            eval_batches=8,
            save_every=100,
            resume=True,
            tensorboard=False,
            log_every=20,
        )
        values.update(options)
        train(TrainConfig(**values))
        return out

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

    text = heldout_text()
    rows = []
    for name, folder in arms.items():
        model = load_model(folder, dtype=torch.float32, device="cpu")
        params = sum(p.numel() for p in model.parameters())
        ppl = perplexity(model, load_tokenizer(folder), text, batch_size=8).token_perplexity
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
