"""SALT against plain training at equal steps (issue #19; docs/training-methods.md "SALT").

    python scripts/salt_experiment.py [--root runs/salt] [--steps 600] [--kd-until-step 150] [--select 0.5]

Every arm trains on the five Austen training novels with `--batch-size` x `--seq-len` tokens a step, the
same optimizer and schedule as scripts/growth_experiment.py (shared through scripts/austen_experiment.py):
- `teacher`: the small model, the default model's width with `--teacher-depth` layers, `--steps` steps;
- `plain`: the large model (`--depth` layers) from random weights, `--steps` steps of cross-entropy
  (the same run as growth_experiment.py's `scratch` arm: pass `--plain FOLDER` to reuse one);
- `salt`: the large model with distillation from the teacher for the first `--kd-until-step` steps;
- `salt-ds`: the same, distilling on the `--select` fraction of candidates the teacher picks (SALT_DS).
Then each final model's per-token perplexity on the held-out *Persuasion* (float32). An arm whose folder
already holds a model is not retrained.
"""

from __future__ import annotations

import json
from pathlib import Path

from austen_experiment import Experiment


def main() -> None:
    def more(p):
        p.add_argument("--depth", type=int, default=8)
        p.add_argument("--teacher-depth", type=int, default=2)
        p.add_argument("--kd-until-step", type=int, default=150)
        p.add_argument("--kd-weight", type=float, default=0.5)
        p.add_argument("--kd-temperature", type=float, default=1.0)
        p.add_argument("--select", type=float, default=0.5)
        p.add_argument("--plain", default=None, help="an already trained plain arm (same options) to reuse")

    args, exp = Experiment.from_args(__doc__, "runs/salt", steps=600, lr=2e-3, more=more)
    large = str(exp.model_config("large", num_hidden_layers=args.depth))
    small = str(exp.model_config("small", num_hidden_layers=args.teacher_depth))
    teacher = exp.run("teacher", args.steps, model_config=small)
    kd = dict(
        model_config=large,
        teacher=str(teacher),
        kd_until_step=args.kd_until_step,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
    )
    arms = {
        "teacher": teacher,
        "plain": Path(args.plain) if args.plain else exp.run("plain", args.steps, model_config=large),
        "salt": exp.run("salt", args.steps, **kd),
        "salt-ds": exp.run("salt-ds", args.steps, **kd, kd_select=args.select),
    }
    rows = []
    for name, folder in arms.items():
        ppl = exp.persuasion_perplexity(folder)
        rows.append({"arm": name, "perplexity": round(ppl, 3)})
        print(f"{name:8s} Persuasion perplexity {ppl:.3f}", flush=True)
    print(f"\n{args.batch_size * args.seq_len * args.steps:,} training tokens per arm")
    print("| arm | Persuasion perplexity |\n|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['perplexity']:.3f} |")
    (Path(args.root) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
