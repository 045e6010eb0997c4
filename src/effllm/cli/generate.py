"""`effllm generate`: continue a prompt, streaming the text to the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effllm.core.errors import InputError
from effllm.core.text import check_text
from effllm.engine.config import add_engine_flags, engine_options

ENGINE_EXCLUDED = ("seed",)  # --seed is the request's sampling seed, not the engine generator's


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt (streams the text)",
        description="Continue PROMPT with the model, streaming the new text to stdout.",
    )
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the embedded default model)"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens to generate (default 128)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument(
        "--adapter", default=None, help="generate with this LoRA adapter, one loaded by --lora NAME=PATH"
    )
    constraint = p.add_argument_group(
        "structured output (one of these; JSON schema, regex and grammar need pip install 'effllm[structured]')"
    ).add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", default=None, metavar="FILE|JSON", help="the output is JSON valid under this schema"
    )
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    constraint.add_argument("--regex", default=None, help="the output matches this regular expression")
    constraint.add_argument(
        "--grammar",
        default=None,
        metavar="FILE|TEXT",
        help="the output follows this EBNF (::=) or Lark grammar",
    )
    constraint.add_argument(
        "--choice", action="append", default=None, help="the output is one of these strings (repeatable)"
    )
    add_engine_flags(p.add_argument_group("engine options (EngineConfig fields)"), exclude=ENGINE_EXCLUDED)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from effllm.engine import LLMEngine, SamplingParams
    from effllm.models.default import model_or_default

    prompt = check_text(sys.stdin.read() if args.prompt == "-" else args.prompt, "the prompt")
    for text, what in [(args.system or "", "--system"), *((s, "--stop") for s in args.stop)]:
        check_text(text, what)
    if any(not s for s in args.stop):
        raise InputError("--stop needs a non-empty string")
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=list(args.stop),
        structured=_constraint(args),
        adapter=args.adapter,
    )
    engine = LLMEngine.from_pretrained(model_or_default(args.model), **engine_options(args, ENGINE_EXCLUDED))
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise InputError(
            f"{args.model or 'the model'} has no tokenizer.json, which effllm generate needs to read "
            "the prompt; pass a checkpoint folder that holds one"
        )
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        request = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    else:
        request = {"prompt_token_ids": tokenizer.encode(prompt)}
    engine.add_request("generate", request, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            _write(output.outputs[0].delta_text)
    _write("\n")
    return 0


def _constraint(args: argparse.Namespace) -> dict | None:
    """The --json-schema/--json-object/--regex/--grammar/--choice constraint (a file's text for FILE)."""
    if args.json_schema is not None:
        return {"json_schema": _file_or_text(args.json_schema)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _file_or_text(args.grammar)}
    if args.choice is not None:
        return {"choice": args.choice}
    return None


def _file_or_text(value: str) -> str:
    path = Path(value)
    try:
        return path.read_text() if path.is_file() else value
    except OSError as e:
        raise InputError(f"cannot read {value}: {e.strerror}") from None


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
