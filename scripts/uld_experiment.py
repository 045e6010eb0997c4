"""ULD unlearning on the default model (issue #19; docs/training-methods.md "ULD").

    python scripts/uld_experiment.py [--root runs/uld] [--name Darcy] [--steps 200]

Forget set: every sentence of the five training novels that names `--name` (Darcy: 412 sentences of
*Pride and Prejudice*); retain set: the rest of the five novels. The assistant (the default model's first
layer with LoRA r16/alpha32/dropout 0.05 on every linear, ULD's recipe) is trained by
`effllm train --method uld`. Then, base against base - w * assistant (w = 1):
- forget-set perplexity per token, and the mean log-probability of the name's tokens where it occurs;
- retain: perplexity of the held-out *Persuasion* (which never names Darcy) and of a retain sample;
scored with ULD's unfiltered combination (log_softmax(base) - w log_softmax(assistant), renormalised; the
relative-top filter of generation would give a token outside the base's top set probability 0, and so
an infinite perplexity), in disjoint windows of 256 tokens. Last, greedy continuations of a few prompts
from the engine, with and without `--uld-assistant` (filter 0.1, as served).
"""

from __future__ import annotations

import json
import math
import re

import torch
from austen_experiment import Experiment

from effllm.engine import LLM, SamplingParams
from effllm.engine.logit_difference import logit_difference
from effllm.eval.corpus import heldout_text, training_text
from effllm.models import load_model, load_tokenizer
from effllm.models.default import default_model_path

PROMPTS = ["Elizabeth looked up and saw Mr.", '"I am sure," said Mr.', "Mr. Bingley and his friend Mr."]


@torch.inference_mode()
def scores(base, assistant, ids: list[int], window: int, weight: float, name_ids: list[int] | None = None):
    """(perplexity per token, mean log p of the name's tokens) under the base alone or combined."""
    n = (len(ids) - 1) // window
    x = torch.tensor(ids[: n * window + 1])
    inputs, targets = x[:-1].view(n, window), x[1:].view(n, window)
    nll, count, name_lp, name_count = 0.0, 0, 0.0, 0
    for i in range(0, n, 8):
        logits = base(inputs[i : i + 8]).float()
        if assistant is not None:
            logits = logit_difference(logits, assistant(inputs[i : i + 8]), weight, relative_top=0.0)
        logp = logits.log_softmax(-1).gather(-1, targets[i : i + 8, :, None])[..., 0]
        nll -= float(logp.sum())
        count += logp.numel()
        if name_ids:
            hit = torch.isin(targets[i : i + 8], torch.tensor(name_ids))
            name_lp += float(logp[hit].sum())
            name_count += int(hit.sum())
    return math.exp(nll / count), (name_lp / name_count if name_count else float("nan"))


def main() -> None:
    def more(p):
        p.add_argument("--name", default="Darcy")
        p.add_argument("--weight", type=float, default=1.0)

    args, exp = Experiment.from_args(__doc__, "runs/uld", steps=200, lr=1e-3, batch_size=8, more=more)
    root = exp.root
    sentences = re.split(r"(?<=[.!?])\s+", training_text())
    forget = [s for s in sentences if args.name in s]
    retain = [s for s in sentences if args.name not in s]
    (root / "data").mkdir(parents=True, exist_ok=True)
    forget_file, retain_file = root / "data" / "forget.txt", root / "data" / "retain.txt"
    forget_file.write_text("\n".join(forget) + "\n")
    retain_file.write_text("\n".join(retain) + "\n")
    default = default_model_path()
    out = exp.run(
        "assistant",
        args.steps,
        model=str(default),
        tokenizer=None,
        data=[],
        forget=[str(forget_file)],
        retain=[str(retain_file)],
        method="uld",
        lora_targets=["all-linear"],
        lora_rank=16,
        lora_alpha=32.0,
        lora_dropout=0.05,
        eval_every=50,
        save_every=50,
    )
    tok = load_tokenizer(default)
    base = load_model(default, dtype=torch.float32, device="cpu").eval()
    assistant = load_model(out, dtype=torch.float32, device="cpu").eval()
    name_ids = sorted(set(tok.encode(" " + args.name, add_special_tokens=False)))
    texts = {
        "forget set": tok.encode("\n".join(forget), add_special_tokens=False),
        "Persuasion (held out)": tok.encode(heldout_text(), add_special_tokens=False),
        "retain sample": tok.encode("\n".join(retain[: len(forget) * 4]), add_special_tokens=False),
    }
    rows = []
    for label, ids in texts.items():
        names = name_ids if label == "forget set" else None
        b_ppl, b_name = scores(base, None, ids, args.seq_len, args.weight, names)
        u_ppl, u_name = scores(base, assistant, ids, args.seq_len, args.weight, names)
        rows.append(
            {"text": label, "base": b_ppl, "uld": u_ppl, "base_name_logp": b_name, "uld_name_logp": u_name}
        )
        print(
            f"{label:22s} perplexity {b_ppl:9.2f} -> {u_ppl:9.2f} ({100 * (u_ppl / b_ppl - 1):+.1f}%)",
            flush=True,
        )
        if names:
            print(f"{'':22s} mean log p of '{args.name}' tokens {b_name:.3f} -> {u_name:.3f}", flush=True)
    params = SamplingParams(temperature=0, max_tokens=12)
    plain = LLM(str(default)).generate(PROMPTS, params, use_tqdm=False)
    unlearned = LLM(str(default), uld_assistant=str(out), uld_weight=args.weight).generate(
        PROMPTS, params, use_tqdm=False
    )
    samples = [
        {"prompt": q, "base": a.outputs[0].text, "uld": b.outputs[0].text}
        for q, a, b in zip(PROMPTS, plain, unlearned, strict=True)
    ]
    for s in samples:
        print(f"{s['prompt']!r}\n   base: {s['base']!r}\n   ULD:  {s['uld']!r}")
    print(f"\n{len(forget)} forget sentences, {len(retain)} retain sentences; {args.steps} steps")
    print("| text | base perplexity | ULD perplexity | change |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['text']} | {r['base']:.2f} | {r['uld']:.2f} | {100 * (r['uld'] / r['base'] - 1):+.1f}% |"
        )
    result = {"args": vars(args), "rows": rows, "samples": samples, "name_token_ids": name_ids}
    (root / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
