"""G_stack against training the deep model from scratch at equal training tokens (issue #19;
docs/training-methods.md "G_stack growth").

    python scripts/growth_experiment.py [--root runs/growth] [--steps 600] [--small-steps 150] [--factor 4]

Both arms have the default model's width and tokenizer and train on the five Austen training novels with
`--batch-size` x `--seq-len` tokens a step:
- `scratch`: the deep model (`--depth` layers) from random weights for `--steps` steps;
- `stacked`: a `--depth / --factor`-layer model from random weights for `--small-steps` steps, grown by
  G_stack (`effllm train grow`), then trained for the remaining steps with a fresh optimizer.
Then each final model's per-token perplexity on the held-out *Persuasion* (float32) and the training FLOPs
each arm spent (6 N per token). An arm whose folder already holds a model is not retrained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effllm.eval.corpus import heldout_text, training_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.config import ModelConfig
from effllm.models.default import default_model_path
from effllm.train import TrainConfig, train
from effllm.train.growth import stack
from effllm.train.pruning_aware import parameter_count

CONFIG = Path("recipes/default-model/config.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/growth")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--small-steps", type=int, default=150)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    root = Path(args.root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    data = root / "data" / "austen.txt"
    if not data.exists():
        data.write_text(training_text())
    base = json.loads(CONFIG.read_text())
    configs = {}
    for name, depth in (("deep", args.depth), ("small", args.depth // args.factor)):
        configs[name] = root / "data" / f"{name}-config.json"
        configs[name].write_text(json.dumps(base | {"num_hidden_layers": depth}, indent=2))

    def run(name: str, steps: int, **options) -> Path:
        out = root / name
        if (out / "model.safetensors").exists():
            print(f"{name}: already trained, kept", flush=True)
            return out
        values = dict(
            tokenizer=str(default_model_path()),
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
            log_every=50,
        )
        values.update(options)
        train(TrainConfig(**values))
        return out

    arms = {"scratch": run("scratch", args.steps, model_config=str(configs["deep"]))}
    small = run("small", args.small_steps, model_config=str(configs["small"]))
    grown = root / "grown"
    if not (grown / "model.safetensors").exists():
        save_model(
            stack(load_model(small, dtype=torch.float32), factor=args.factor), grown, load_tokenizer(small)
        )
    arms["stacked"] = run("stacked", args.steps - args.small_steps, model=str(grown), tokenizer=None)
    tokens_per_step = args.batch_size * args.seq_len
    n_deep = parameter_count(ModelConfig.from_json_file(configs["deep"]))
    n_small = parameter_count(ModelConfig.from_json_file(configs["small"]))
    flops = {
        "scratch": 6 * n_deep * tokens_per_step * args.steps,
        "stacked": 6
        * tokens_per_step
        * (n_small * args.small_steps + n_deep * (args.steps - args.small_steps)),
    }
    rows = []
    for name, folder in arms.items():
        model = load_model(folder, dtype=torch.float32, device="cpu")
        ppl = perplexity(model, load_tokenizer(folder), heldout_text(), batch_size=8).token_perplexity
        rows.append({"arm": name, "perplexity": round(ppl, 3), "train_flops": flops[name]})
        print(f"{name:8s} Persuasion perplexity {ppl:.3f}, {flops[name]:.3e} training FLOPs", flush=True)
    print(f"\n{tokens_per_step * args.steps:,} training tokens per arm")
    print("| arm | Persuasion perplexity | training FLOPs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['perplexity']:.3f} | {r['train_flops']:.3e} |")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
