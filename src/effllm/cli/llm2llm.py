"""`effllm llm2llm`: LLM2LLM's loop: fine-tune, find the seed items the student gets wrong, have a teacher
write new items like them, fine-tune again from the base (`effllm.train.llm2llm`)."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  effllm serve --model big-model --port 8001 &                      # any OpenAI-compatible teacher
  effllm llm2llm --model small-model --seed seed.jsonl --teacher-url http://127.0.0.1:8001/v1 \\
      --out runs/l2l --rounds 3 --steps 200 --lr 1e-4 --match number
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "llm2llm",
        help="LLM2LLM: grow a fine-tuning set from a teacher where the student fails (rounds resume)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="the base to fine-tune each round (default: the embedded model)"
    )
    p.add_argument("--seed", required=True, help="JSON lines with 'prompt' and 'completion': the seed set")
    p.add_argument(
        "--teacher-url", required=True, help="an OpenAI-compatible endpoint, e.g. http://HOST:PORT/v1"
    )
    p.add_argument(
        "--teacher-model", default=None, help="the teacher's model name (default: its first model)"
    )
    p.add_argument(
        "--teacher-temperature", type=float, default=0.7, help="sampling temperature of the teacher"
    )
    p.add_argument("--out", required=True, help="run folder: one round-K folder per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of fine-tune, judge, augment (default 3)")
    p.add_argument(
        "--per-seed", type=int, default=1, help="new items per wrong seed item (default 1, the paper's)"
    )
    p.add_argument(
        "--match", default="exact", help="how answers are judged: exact, contains or number (default exact)"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="longest student answer when judging")
    p.add_argument("--train-config", default=None, help="YAML of effllm train options for every round")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default 100)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed sequence (default 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from effllm.core.errors import InputError
    from effllm.models.default import model_or_default
    from effllm.train.llm2llm import make_judge, openai_teacher, read_items, run_llm2llm

    options: dict = {"steps": 100, "lr": 1e-4, "batch_size": 8, "seq_len": 256, "tensorboard": False}
    if args.train_config:
        try:
            loaded = yaml.safe_load(Path(args.train_config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"cannot read --train-config {args.train_config}: {e}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"--train-config {args.train_config} must hold a mapping of train options")
        options |= {str(k).replace("-", "_"): v for k, v in loaded.items()}
    for name in ("steps", "lr", "batch_size", "seq_len"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    results = run_llm2llm(
        str(model_or_default(args.model)),
        read_items(args.seed),
        args.out,
        openai_teacher(args.teacher_url, args.teacher_model, args.teacher_temperature),
        options,
        rounds=args.rounds,
        per_seed=args.per_seed,
        judge=make_judge(args.match),
        max_tokens=args.max_tokens,
    )
    print("| round | items trained on | seed accuracy | new items |\n|---|---|---|---|")
    for r in results:
        print(f"| {r.round} | {r.train_items} | {r.accuracy:.3f} | {r.new_items} |")
    return 0
