"""QoQ's ablation on one model (docs/compression.md): KV-cache quantization, then each W4A8KV4 step added.

    python scripts/qoq_ablation.py [--model M] [--words 25000] [--out results.json]

Every row loads the model in its own dtype, applies the row's steps (`effllm.compress.qoq`, 64 calibration
samples x 256 tokens of the shipped training books) and measures per-token perplexity on the held-out
*Persuasion* (its first `--words` words) as `effllm eval perplexity --kv-cache-dtype ...` does: keys and
values round-tripped through the engine's int8/int4 cache format. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

from effllm.compress import W4A8, W4A16, calibration_ids, qoq, quantize_  # noqa: F401
from effllm.compress.calibration import LayerByLayer
from effllm.eval.corpus import heldout_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer
from effllm.models.default import default_model_path
from effllm.models.kv_round_trip import with_kv_round_trip


def smooth_attention_only(model, ids) -> None:
    """SmoothAttention folded into q_proj/k_proj, the weights left in their dtype."""
    runner = LayerByLayer(model, ids)
    for _, layer in runner.layers():
        qoq.fold_smooth_attention(layer.self_attn, qoq.smooth_attention_scales(qoq.key_max(layer, runner)))
        runner.run(layer, advance=True)


PROGRESSIVE = dict(method="rtn", rotate=False, smooth_linear=False, smooth_attention=False)
ROWS = [  # (label, KV bits or None, what to do to the model)
    ("bf16 weights, bf16 KV", None, None),
    ("KV8", 8, None),
    ("KV4", 4, None),
    ("KV4 + SmoothAttention", 4, smooth_attention_only),
    ("W4A16 g128 RTN + KV4", 4, W4A16(group_size=128, method="rtn")),
    ("W4A16 g32 RTN + KV4", 4, W4A16(group_size=32, method="rtn")),
    ("W4A8 progressive g128 RTN + KV4", 4, W4A8(**PROGRESSIVE)),
    ("+ rotation", 4, W4A8(**{**PROGRESSIVE, "rotate": True})),
    ("+ SmoothLinear (alpha 0.3)", 4, W4A8(**{**PROGRESSIVE, "rotate": True, "smooth_linear": True})),
    (
        "+ SmoothAttention",
        4,
        W4A8(**{**PROGRESSIVE, "rotate": True, "smooth_linear": True, "smooth_attention": True}),
    ),
    ("+ GPTQ = QoQ W4A8KV4", 4, W4A8(method="gptq", smooth_attention=True)),
    ("QoQ W4A8KV4 + weight clipping", 4, W4A8(method="gptq", smooth_attention=True, clip=True)),
    ("QoQ W4A8 (bf16 KV)", None, W4A8(method="gptq")),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument(
        "--words", type=int, default=25000, help="score the first N words of Persuasion (0: all)"
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    text = heldout_text()
    if args.words:
        text = " ".join(text.split(" ")[: args.words])
    ids = calibration_ids(tokenizer, 64, 256)
    rows, base = [], None
    for label, kv, step in ROWS:
        model = load_model(args.model, device="cpu")
        start = time.perf_counter()
        if callable(step):
            step(model, ids)
        elif step is not None:
            quantize_(
                model,
                step,
                calibration=None if step.method == "rtn" and isinstance(step, W4A16) else ids,
                show_progress=False,
            )
        seconds = time.perf_counter() - start
        scored = model if kv is None else with_kv_round_trip(model, kv)
        ppl = perplexity(scored, tokenizer, text).token_perplexity
        base = base or ppl
        rows.append(
            {
                "variant": label,
                "kv_bits": kv,
                "perplexity": ppl,
                "change_percent": 100 * (ppl / base - 1),
                "seconds": round(seconds, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | Persuasion ppl/token | change |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['change_percent']:+.2f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "words": args.words, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
