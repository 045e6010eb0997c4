"""Held-out quality of every quantization scheme and method on one model (docs/compression.md's table).

    python scripts/compress_quality.py [--model M] [--out results.json]

For each configuration: load the model (its own dtype), quantize it with `effllm.compress.quantize_` (64
calibration samples x 256 tokens of the shipped training books for the data-driven methods), and measure
per-token perplexity on the held-out *Persuasion* (or its first `--words` words) exactly as `effllm eval
perplexity` does (windows of the model's context, stride half of it). Prints a Markdown table with the change against the dense model.
"""

from __future__ import annotations

import argparse
import json
import time

from effllm.compress import W4A16, W8A8, W8A16, calibration_ids, quantize_
from effllm.eval.corpus import heldout_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer
from effllm.models.default import default_model_path

CONFIGS = [
    ("W8A16", "rtn", W8A16()),
    ("W8A8", "rtn", W8A8()),
    ("W8A8", "smoothquant", W8A8(method="smoothquant")),
    *[
        (f"W4A16 g{g}", m, W4A16(group_size=g, method=m))
        for g in (32, 64, 128)
        for m in ("rtn", "gptq", "awq")
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--words", type=int, default=None, help="score only the first N words of Persuasion")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    text = heldout_text()
    if args.words:
        text = " ".join(text.split(" ")[: args.words])
    ids = calibration_ids(tokenizer, 64, 256)
    base = perplexity(load_model(args.model, device="cpu"), tokenizer, text).token_perplexity
    rows = [{"scheme": "dense", "method": "-", "perplexity": base, "change_percent": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for scheme, method, config in CONFIGS:
        model = load_model(args.model, device="cpu")
        start = time.perf_counter()
        quantize_(model, config, calibration=None if method == "rtn" else ids, show_progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tokenizer, text).token_perplexity
        rows.append(
            {
                "scheme": scheme,
                "method": method,
                "perplexity": ppl,
                "change_percent": 100 * (ppl / base - 1),
                "quantize_seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("\n| scheme | method | Persuasion ppl/token | change |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['method']} | {r['perplexity']:.2f} | {r['change_percent']:+.2f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
