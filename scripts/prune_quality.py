"""Held-out quality of every one-shot pruning method and pattern on one model (docs/compression.md's table).

    python scripts/prune_quality.py [--model M] [--words N] [--out results.json]

For each (method, pattern): load the model in float32, prune it with `effllm.compress.prune.prune_` (64
calibration samples x 256 tokens of the shipped training books for Wanda and SparseGPT, the same ids for
both), and measure per-token perplexity on the held-out *Persuasion* (or its first `--words` words) as
`effllm eval perplexity` does. Prints a Markdown table with the change against the dense model.
"""

from __future__ import annotations

import argparse
import json
import time

from effllm.compress import calibration_ids
from effllm.compress.prune import PRUNE_METHODS, prune_
from effllm.eval.corpus import heldout_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer
from effllm.models.default import default_model_path

PATTERNS = ("unstructured", "4:8", "2:4")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (default 0.5)")
    parser.add_argument("--words", type=int, default=None, help="score only the first N words of Persuasion")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    text = heldout_text()
    if args.words:
        text = " ".join(text.split(" ")[: args.words])
    ids = calibration_ids(tokenizer, 64, 256)

    def score(model) -> float:
        return perplexity(model, tokenizer, text, batch_size=8).token_perplexity

    dense = score(load_model(args.model, dtype="float32", device="cpu"))
    rows = [{"method": "dense", "pattern": "-", "perplexity": round(dense, 3), "change": 0.0, "seconds": 0.0}]
    for pattern in PATTERNS:
        for method in PRUNE_METHODS:
            model = load_model(args.model, dtype="float32", device="cpu")
            start = time.perf_counter()
            prune_(model, method, args.sparsity, pattern, calibration=None if method == "magnitude" else ids)
            seconds = time.perf_counter() - start
            ppl = score(model)
            rows.append(
                {
                    "method": method,
                    "pattern": pattern,
                    "perplexity": round(ppl, 3),
                    "change": round(ppl / dense - 1, 4),
                    "seconds": round(seconds, 1),
                }
            )
            print(
                f"{method:10s} {pattern:12s} {ppl:10.3f} ({ppl / dense - 1:+.1%}) in {seconds:.1f} s",
                flush=True,
            )
    print("\n| method | pattern | perplexity | vs dense | prune time |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['pattern']} | {r['perplexity']:.3f} | {r['change']:+.1%} | {r['seconds']} s |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "sparsity": args.sparsity, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
