"""Pre-train the default model's architecture from scratch with AdamW, GaLore and ZO-SGD at equal steps.

    python scripts/optimizer_comparison.py [--steps 200] [--batch-size 8] [--out runs/optimizer-comparison]

Each run is `effllm train` on the Austen training text (the default model's data, tokenizer and
config.json; Persuasion held out), then `effllm eval perplexity` on Persuasion with the trained window
(--seq-len; stride half of it). Prints a Markdown table
and writes `results.json` under --out. Needs `python scripts/default_model/build.py data tokenizer` first.
Reruns skip runs whose final model exists (delete the run folder to retrain).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "default-model"

# name -> (optimizer, lr, optimizer options). lr: the default model's AdamW lr; GaLore's paper pre-training
# lr 0.01 with scale 0.25 (rank 128 of hidden 384); ZO-SGD: the best of 1e-3/1e-4/1e-5 after 30 steps.
RUNS = {
    "adamw": ("adamw", 2e-3, ["betas=[0.9,0.95]"]),
    "galore": ("galore_adamw", 1e-2, ["rank=128", "scale=0.25", "update_proj_gap=200"]),
    "zo-sgd": ("zo_sgd", 1e-4, ["zo_eps=1e-3"]),
}


def main() -> int:
    from effllm.cli import main as effllm

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "optimizer-comparison")
    args = parser.parse_args()
    if not (RUN / "data" / "train.txt").exists() or not (RUN / "tokenizer").exists():
        sys.exit(
            "no training text or tokenizer: run `python scripts/default_model/build.py data tokenizer` first"
        )

    results = {}
    for name in args.runs:
        optimizer, lr, options = RUNS[name]
        out = args.out / name
        start = time.perf_counter()
        if not (out / "model.safetensors").exists():
            rc = effllm(
                [
                    "train",
                    "--model-config",
                    str(ROOT / "recipes" / "default-model" / "config.json"),
                    "--tokenizer",
                    str(RUN / "tokenizer"),
                    "--data",
                    str(RUN / "data" / "train.txt"),
                    "--out",
                    str(out),
                    "--seq-len",
                    str(args.seq_len),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                    "--optimizer",
                    optimizer,
                    "--optimizer-options",
                    *options,
                    "--lr",
                    str(lr),
                    "--warmup-steps",
                    str(max(1, args.steps // 20)),
                    "--schedule",
                    "cosine",
                    "--min-lr-ratio",
                    "0.1",
                    "--weight-decay",
                    "0.0",
                    "--clip-grad",
                    "1.0",
                    "--precision",
                    "bf16",
                    "--eval-fraction",
                    "0.02",
                    "--eval-every",
                    "0",
                    "--save-every",
                    "0",
                    "--seed",
                    "0",
                    "--log-every",
                    "20",
                ]
            )
            if rc:
                return rc
        train_s = time.perf_counter() - start
        eval_json = out / "persuasion.json"
        if not eval_json.exists():
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                rc = effllm(
                    ["eval", "perplexity", "--model", str(out), "--max-length", str(args.seq_len), "--json"]
                )
            if rc:
                return rc
            eval_json.write_text(buffer.getvalue())
        metrics = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        last = metrics[-1]
        ppl = json.loads(eval_json.read_text())
        results[name] = {
            "optimizer": optimizer,
            "lr": lr,
            "options": options,
            "steps": args.steps,
            "tokens": last.get("tokens"),
            "final_train_loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"),
            "persuasion": ppl,
            "wall_s": train_s,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        "| optimizer | lr | steps | tokens | final train loss | held-out loss (2% split) "
        "| Persuasion ppl/token | Persuasion ppl/word |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["persuasion"]
        print(
            f"| {name} ({' '.join(r['options'])}) | {r['lr']:g} | {r['steps']} | {r['tokens']:,} "
            f"| {r['final_train_loss']:.3f} | {r['eval_loss']:.3f} | {p['token_perplexity']:.1f} "
            f"| {p['word_perplexity']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
