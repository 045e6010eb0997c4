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

import json

import torch
from austen_experiment import Experiment

from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.config import ModelConfig
from effllm.train.growth import stack
from effllm.train.pruning_aware import parameter_count


def main() -> None:
    def more(p):
        p.add_argument("--small-steps", type=int, default=150)
        p.add_argument("--depth", type=int, default=8)
        p.add_argument("--factor", type=int, default=4)

    args, exp = Experiment.from_args(__doc__, "runs/growth", steps=600, lr=2e-3, more=more)
    root = exp.root
    configs = {
        "deep": exp.model_config("deep", num_hidden_layers=args.depth),
        "small": exp.model_config("small", num_hidden_layers=args.depth // args.factor),
    }
    run = exp.run

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
        ppl = exp.persuasion_perplexity(folder)
        rows.append({"arm": name, "perplexity": round(ppl, 3), "train_flops": flops[name]})
        print(f"{name:8s} Persuasion perplexity {ppl:.3f}, {flops[name]:.3e} training FLOPs", flush=True)
    print(f"\n{tokens_per_step * args.steps:,} training tokens per arm")
    print("| arm | Persuasion perplexity | training FLOPs |\n|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['perplexity']:.3f} | {r['train_flops']:.3e} |")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
