"""DKM on the default model (issue #19; docs/training-methods.md "DKM").

    python scripts/dkm_experiment.py [--root runs/dkm] [--bits 3] [--steps 100]

Three models of the default model's weights, every decoder linear palettized to 2^bits values per matrix:
- `k-means`: post-training, each matrix snapped to its k-means centroids (DKM finalised without training);
- `dkm`: `effllm train --method dkm` for `--steps` steps on the five Austen training novels from the
  default model, then finalised;
- `fine-tuned`: the same training without DKM, then snapped by k-means, so that the fine-tuning itself is
  not mistaken for DKM's gain.
Each is scored on the held-out *Persuasion* (per token, float32), against the dense default model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from austen_experiment import Experiment

from effllm.compress.dkm import apply_dkm, finalize_dkm
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.default import default_model_path


def snapped(folder: Path, out: Path, bits: int) -> Path:
    """`folder`'s model with every decoder matrix snapped to its k-means palette, saved to `out`."""
    if not (out / "model.safetensors").exists():
        model = load_model(folder, dtype=torch.float32, device="cpu").eval()
        apply_dkm(model, bits)
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long))  # the first forward seeds each palette by k-means
        finalize_dkm(model)
        save_model(model, out, load_tokenizer(folder))
    return out


def main() -> None:
    args, exp = Experiment.from_args(
        __doc__,
        "runs/dkm",
        steps=100,
        lr=2e-4,
        batch_size=8,
        more=lambda p: p.add_argument("--bits", type=int, default=3),
    )
    root = exp.root
    default = default_model_path()
    common = dict(model=str(default), tokenizer=None, weight_decay=0.0, eval_every=50, save_every=50)
    arms = {
        "dense": default,
        "k-means": snapped(default, root / "k-means", args.bits),
        "dkm": exp.run("dkm", args.steps, method="dkm", dkm_bits=args.bits, **common),
        "fine-tuned": snapped(
            exp.run("fine-tuned-dense", args.steps, **common), root / "fine-tuned", args.bits
        ),
    }
    rows = []
    for name, folder in arms.items():
        ppl = exp.persuasion_perplexity(folder)
        model = load_model(folder, dtype=torch.float32, device="cpu")
        values = max(  # the dkm arm is written palettized, the others dense with snapped weights
            int((m.dequantized_weight() if hasattr(m, "palette") else m.weight).unique().numel())
            for n, m in model.named_modules()
            if n.endswith("down_proj")
        )
        rows.append({"model": name, "perplexity": round(ppl, 3), "distinct_values_per_matrix": values})
        print(
            f"{name:11s} Persuasion perplexity {ppl:.3f} ({values} distinct values in a down_proj)",
            flush=True,
        )
    dense = rows[0]["perplexity"]
    print(
        f"\n{args.bits}-bit palettes; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens of training"
    )
    print("| model | Persuasion perplexity | vs dense |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / dense - 1):+.1f}% |")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
