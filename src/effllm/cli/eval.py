"""`effllm eval`: perplexity, the Persuasion cloze set, multiple-choice tasks and the bigram baseline.

    effllm eval perplexity [FILE] [--model M] [--max-length N] [--stride N]   (default FILE: Persuasion)
    effllm eval cloze [--model M] [--limit N]
    effllm eval task --task hellaswag|piqa|arc_easy|arc_challenge|mc FILE.jsonl [--model M] [--limit N]
    effllm eval bigram

Results print as a table, or as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from effllm.core.errors import InputError
from effllm.kernels.kv_quant import KV_CACHE_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity, cloze and multiple-choice accuracy (JSON with --json)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="eval_command", metavar="{perplexity,cloze,task,bigram}", required=True)

    q = sub.add_parser(
        "perplexity",
        help="perplexity of a text file, per token and per word",
        description="Perplexity of FILE (default: the held-out book, Persuasion) with a sliding "
        "window; per token, per whitespace-separated word and bits per byte.",
    )
    q.add_argument("file", nargs="?", default=None, help="UTF-8 text file (default: the held-out Persuasion)")
    _add_model_args(q, batch_size=8)
    q.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="window in tokens (default: the model's max_position_embeddings)",
    )
    q.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens each window advances (default: half the window; = window for disjoint windows)",
    )
    q.set_defaults(func=run_perplexity)

    q = sub.add_parser(
        "cloze",
        help="accuracy on the shipped Persuasion last-word cloze set (4-way)",
        description="acc and acc_norm on the 500-item Persuasion cloze set (chance 0.25).",
    )
    _add_model_args(q)
    _add_limit(q)
    q.set_defaults(func=run_cloze)

    q = sub.add_parser(
        "task",
        help="acc and acc_norm on a multiple-choice task from a local jsonl file",
        description="Score a multiple-choice task read from a local jsonl file in lm-eval's "
        "format (see effllm.eval.tasks), as lm-evaluation-harness scores it.",
    )
    q.add_argument("file", help="the task's jsonl file, one document per line")
    q.add_argument(
        "--task", required=True, help="the file's format: hellaswag, piqa, arc_easy, arc_challenge or mc"
    )
    _add_model_args(q)
    _add_limit(q)
    q.set_defaults(func=run_task)

    q = sub.add_parser(
        "bigram", help="the word-bigram baseline on Persuasion: per-word perplexity, cloze acc"
    )
    q.add_argument("--json", action="store_true", help="print JSON to stdout")
    q.set_defaults(func=run_bigram)


def _add_model_args(p: argparse.ArgumentParser, batch_size: int = 16) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the embedded default model)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"sequences per forward pass (default {batch_size})",
    )
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="score as the engine would with this KV cache: keys and values quantized and dequantized per "
        "token and head (default auto: unquantized, or what a quantized checkpoint's config.json asks for)",
    )
    p.add_argument(
        "--soft-prompt",
        default=None,
        metavar="PATH",
        help="score with this soft prompt before every input (`effllm train --method soft-prompt`)",
    )
    p.add_argument("--json", action="store_true", help="print JSON to stdout")


def _add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _load(args: argparse.Namespace):
    from effllm.engine.kv_cache import resolve_kv_bits
    from effllm.models import load_model
    from effllm.models.default import model_or_default
    from effllm.models.kv_round_trip import with_kv_round_trip
    from effllm.models.soft_prompt import load_soft_prompt_into
    from effllm.models.tokenizer import load_tokenizer

    _positive(args, "batch_size", "limit", "max_length", "stride")
    path = model_or_default(args.model)
    model = load_model(path, dtype=args.dtype, device=args.device)
    if args.soft_prompt:
        load_soft_prompt_into(model, args.soft_prompt)
    bits = resolve_kv_bits(args.kv_cache_dtype, model.config)
    return path, model if bits is None else with_kv_round_trip(model, bits), load_tokenizer(path)


def run_perplexity(args: argparse.Namespace) -> int:
    from effllm.eval.corpus import heldout_text, manifest
    from effllm.eval.perplexity import perplexity
    from effllm.models.soft_prompt import context_length

    if args.file is not None and not Path(args.file).is_file():
        raise InputError(f"{args.file} is not a file; pass a UTF-8 text file")
    path, model, tokenizer = _load(args)
    limit = context_length(model)
    if args.max_length is not None and args.max_length > limit:
        raise InputError(f"--max-length {args.max_length} exceeds the model's context of {limit} tokens")
    if args.stride is not None and args.stride > (args.max_length or limit):
        raise InputError(f"--stride {args.stride} exceeds the window of {args.max_length or limit} tokens")
    try:
        text = Path(args.file).read_text(encoding="utf-8") if args.file else heldout_text()
    except UnicodeDecodeError as e:
        raise InputError(f"{args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    name = args.file or manifest()["heldout"]
    result = perplexity(
        model,
        tokenizer,
        text,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        progress=True,
    )
    data = {"model": path, "text": name, **result.to_dict()}
    table = _table(
        ["text", "tokens", "words", "token ppl", "word ppl", "bits/byte", "window", "stride"],
        [
            [
                name,
                f"{result.tokens:,}",
                f"{result.words:,}",
                _perplexity(result.token_perplexity),
                _perplexity(result.word_perplexity),
                f"{result.bits_per_byte:.4f}",
                result.max_length,
                result.stride,
            ]
        ],
    )
    return _emit(args, data, table)


def run_cloze(args: argparse.Namespace) -> int:
    from effllm.eval.cloze import load_cloze

    return _run_multiple_choice(args, "persuasion_cloze", lambda: load_cloze(args.limit))


def run_task(args: argparse.Namespace) -> int:
    from effllm.eval.tasks import load_task

    return _run_multiple_choice(args, args.task, lambda: load_task(args.task, args.file, args.limit))


def _run_multiple_choice(args: argparse.Namespace, task: str, load_docs) -> int:
    from effllm.eval.multiple_choice import score_multiple_choice

    _positive(args, "limit")
    docs = load_docs()
    path, model, tokenizer = _load(args)
    result = score_multiple_choice(model, tokenizer, docs, batch_size=args.batch_size, progress=True)
    data = {"model": path, "task": task, **result.to_dict()}
    table = _table(
        ["task", "docs", "acc", "± stderr", "acc_norm", "± stderr"],
        [
            [
                task,
                result.docs,
                f"{result.acc:.4f}",
                f"{result.acc_stderr:.4f}",
                f"{result.acc_norm:.4f}",
                f"{result.acc_norm_stderr:.4f}",
            ]
        ],
    )
    return _emit(args, data, table)


UNIT_NAMES = {"whitespace": "whitespace-separated words", "words": "letter-only words"}


def run_bigram(args: argparse.Namespace) -> int:
    from effllm.eval.baseline import bigram_baseline

    data = bigram_baseline()
    rows = [
        [
            f"per-word perplexity ({UNIT_NAMES.get(unit, unit)})",
            f"{ppl:.1f}",
            f"{data['words'][unit]:,} words",
        ]
        for unit, ppl in data["word_perplexity"].items()
    ]
    rows.append(
        [
            "cloze acc",
            f"{data['cloze_acc']:.3f}",
            f"± {data['cloze_acc_stderr']:.3f}, chance {data['cloze_chance']:.2f}, {data['cloze_docs']} items",
        ]
    )
    table = f"{data['model']}, trained on the other books, on {data['heldout']}\n" + _table(
        ["metric", "value", "note"], rows
    )
    return _emit(args, data, table)


def _perplexity(value: float) -> str:
    return f"{value:.3f}" if value < 1e6 else f"{value:.3e}"


def _emit(args: argparse.Namespace, data: dict, table: str) -> int:
    print(json.dumps(data, indent=2) if args.json else table)
    sys.stdout.flush()
    return 0


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
