"""Compress-Then-Prompt on the default model (issue #19; docs/training-methods.md "Soft prompts").

    python scripts/soft_prompt_experiment.py [--root runs/soft-prompt] [--steps 300] [--tokens 20]

The default model is compressed without calibration (magnitude pruning: 50% unstructured and 2:4, the
largest losses in docs/compression.md's table), then a soft prompt of `--tokens` vectors is trained for
each compressed model, and for the dense one as a control, on the five Austen training novels
(`effllm train --method soft-prompt`, AdamW, constant lr after a warm-up). Every model is scored on the
held-out *Persuasion* with the same windows of 512 - `--tokens` real tokens (stride half of that), with
and without its prompt. An arm whose folder already holds its output is kept.
"""

from __future__ import annotations

import json

import torch
from austen_experiment import Experiment

from effllm.compress.prune import prune_
from effllm.eval.corpus import heldout_text
from effllm.eval.perplexity import perplexity
from effllm.models import load_model, load_tokenizer, save_model
from effllm.models.default import default_model_path
from effllm.models.soft_prompt import load_soft_prompt_into

COMPRESSIONS = {"dense": None, "magnitude-50%": "unstructured", "magnitude-2:4": "2:4"}


def main() -> None:
    args, exp = Experiment.from_args(
        __doc__,
        "runs/soft-prompt",
        steps=300,
        lr=5e-3,
        batch_size=8,
        more=lambda p: p.add_argument("--tokens", type=int, default=20),
    )
    root = exp.root
    default = default_model_path()
    window = 512 - args.tokens
    rows = []
    for name, pattern in COMPRESSIONS.items():
        folder = root / name / "model"
        if not (folder / "model.safetensors").exists():
            model = load_model(default, dtype=torch.float32, device="cpu")
            if pattern is not None:
                prune_(model, "magnitude", 0.5, pattern, progress=False)
            save_model(model, folder, load_tokenizer(default))
        prompt = exp.run(
            f"{name}/prompt",
            args.steps,
            model=str(folder),
            tokenizer=None,
            method="soft-prompt",
            soft_prompt_tokens=args.tokens,
            schedule="constant",
            warmup_steps=args.steps // 10,
            weight_decay=0.0,
            eval_every=50,
            save_every=100,
            done_file="soft_prompt.safetensors",
        )
        scores = {}
        for with_prompt in (False, True):
            model = load_model(folder, dtype=torch.float32, device="cpu")
            if with_prompt:
                load_soft_prompt_into(model, prompt)
            result = perplexity(
                model, load_tokenizer(folder), heldout_text(), max_length=window, batch_size=8
            )
            scores[with_prompt] = result.token_perplexity
        rows.append(
            {"model": name, "without prompt": round(scores[False], 3), "with prompt": round(scores[True], 3)}
        )
        print(
            f"{name:14s} Persuasion perplexity {scores[False]:.3f} -> {scores[True]:.3f} with the prompt",
            flush=True,
        )
    dense = rows[0]["without prompt"]
    print(
        f"\nwindows of {window} tokens; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens per prompt"
    )
    print("| model | perplexity | with its soft prompt | vs dense, without / with |\n|---|---|---|---|")
    for r in rows:
        a, b = r["without prompt"], r["with prompt"]
        print(
            f"| {r['model']} | {a:.3f} | {b:.3f} | {100 * (a / dense - 1):+.1f}% / {100 * (b / dense - 1):+.1f}% |"
        )
    (root / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
