"""`effllm generate`: continue a prompt, streaming the text to the terminal."""

from __future__ import annotations

import argparse
import sys

from effllm.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt (streams the text)",
        description="Continue PROMPT with the model, streaming the new text to stdout.",
    )
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded default model)")
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from effllm.models import load_model
    from effllm.models.default import model_or_default
    from effllm.models.detokenize import IncrementalDetokenizer
    from effllm.models.generation import GenerationOptions, generate_tokens
    from effllm.models.tokenizer import load_tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    opts = GenerationOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed)
    if any(not s for s in args.stop):
        raise InputError("--stop needs a non-empty string")
    model_path = model_or_default(args.model)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=args.dtype, device=args.device)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(prompt)
    opts.stop_token_ids = list(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))

    stream = StopStringStream(args.stop)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=True)
    stopped = False
    for token in generate_tokens(model, prompt_ids, opts):
        if token in opts.stop_token_ids:
            break
        out, stopped = stream.push(detok.add(token))
        _write(out)
        if stopped:
            break
    if not stopped:
        out, stopped = stream.push(detok.flush())
        _write(out if stopped else out + stream.flush())
    _write("\n")
    return 0


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


class StopStringStream:
    """Cuts streamed text where a stop string begins, holding back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        self.pending += delta
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.pending = self.pending[: min(cuts)], ""
            return out, True
        keep = min(self.hold, len(self.pending))
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
