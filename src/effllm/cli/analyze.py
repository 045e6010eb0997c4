"""`effllm analyze`: roofline, hardware, memory and runtime models, printed as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from effllm.analyze.hardware import (
    get_hardware,
    hardware_file,
    list_hardware,
    measure_hardware,
    save_hardware,
)
from effllm.analyze.memory import inference_memory, training_memory
from effllm.analyze.report import format_hardware, format_memory, format_roofline, format_runtime
from effllm.analyze.roofline import PHASES, analyze
from effllm.analyze.runtime_model import RuntimeModel, fit_runtime_model, load_runs
from effllm.analyze.shapes import PRESETS, load_model_config
from effllm.core.errors import EffLLMError
from effllm.core.flags import parse_key_values
from effllm.kernels.kv_quant import KV_CACHE_DTYPES
from effllm.optim.registry import list_optimizers


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze` and its subcommands (roofline, hardware, memory, runtime)."""
    parser = subparsers.add_parser(
        "analyze",
        help="roofline, memory and runtime models: the limit benchmarks are measured against",
        description="Compute what the hardware allows: per-op rooflines, memory needs, idealized runtimes.",
    )
    sub = parser.add_subparsers(dest="analyze_command", metavar="{roofline,hardware,memory,runtime}")
    sub.required = True
    _add_roofline(sub)
    _add_hardware(sub)
    _add_memory(sub)
    _add_runtime(sub)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"preset ({', '.join(PRESETS)}), folder or config.json, or hub id (config only)",
    )


def _add_bits(p: argparse.ArgumentParser, a_default: str = "16") -> None:
    p.add_argument(
        "--w-bits", type=float, default=None, help="weight bits (default: a quantized checkpoint's, else 16)"
    )
    p.add_argument("--a-bits", type=float, default=None, help=f"activation bits (default {a_default})")
    p.add_argument("--kv-bits", type=float, default=None, help="KV cache bits (default: --a-bits)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=None,
        help="the engine's KV-cache storage, counted with its per-token scales (int4 at head_dim 64: 4.5 bits); "
        "overrides --kv-bits (default: a quantized checkpoint's, else --kv-bits)",
    )


def _bits(args: argparse.Namespace) -> dict[str, float]:
    """w_bits and a_bits: the flags, else what a quantized checkpoint's config.json states, else 16."""
    from effllm.analyze.shapes import checkpoint_bits, load_model_config

    w_bits, a_bits = 16.0, None
    if args.w_bits is None or args.a_bits is None:
        w_bits, a_bits = checkpoint_bits(load_model_config(_model(args)))
    return {
        "w_bits": w_bits if args.w_bits is None else args.w_bits,
        "a_bits": (a_bits or 16.0) if args.a_bits is None else args.a_bits,
    }


def _kv_bits(args: argparse.Namespace) -> float | None:
    """KV bits per value: --kv-cache-dtype (scales included), else --kv-bits, else a checkpoint's KV dtype."""
    from effllm.analyze.shapes import load_model_config
    from effllm.engine.kv_cache import resolve_kv_bits
    from effllm.kernels.kv_quant import bits_per_value

    if args.kv_cache_dtype is None and args.kv_bits is not None:
        return args.kv_bits
    config = load_model_config(_model(args))
    bits = resolve_kv_bits(args.kv_cache_dtype or "auto", config)
    return args.kv_bits if bits is None else bits_per_value(config.head_dim, bits)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON to stdout")


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _model(args: argparse.Namespace):
    from effllm.models.default import model_or_default

    return model_or_default(args.model)


# ---------------------------------------------------------------------- roofline
def _add_roofline(sub) -> None:
    p = sub.add_parser("roofline", help="per-op roofline of prefill, decode or a whole generate task")
    _add_model(p)
    p.add_argument("--hardware", required=True, help="hardware name (see `analyze hardware --list`) or .json")
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="decode: cached tokens; prefill without --prompt: the prompt length; "
        "prefill with --prompt: tokens already cached (a chunk)",
    )
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (prefill, generate)")
    p.add_argument("--output", type=int, default=None, help="output tokens (generate)")
    _add_bits(p)
    p.add_argument(
        "--unfused-attention",
        action="store_true",
        help="attention through a score matrix in memory instead of one fused kernel",
    )
    p.add_argument(
        "--sparsity",
        default=None,
        metavar="N:M",
        help="decoder linears pruned N:M (N zeros in every M, e.g. 2:4), as hardware that runs the pattern "
        "executes them: only the kept multiply-adds, compressed weights with position indices",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="also write the roofline plot here")
    _add_json(p)
    p.set_defaults(func=run_roofline)


def run_roofline(args: argparse.Namespace) -> int:
    prompt, context, output = args.prompt, args.context, args.output
    if args.phase == "prefill" and prompt is None:
        prompt, context = context, None
    elif args.phase == "decode" and context is None:
        context = prompt
    elif args.phase == "generate":
        prompt = prompt if prompt is not None else context
        if prompt is None or output is None:
            raise EffLLMError("--phase generate needs --prompt P and --output O")
    if args.phase == "decode" and context is None:
        raise EffLLMError("--phase decode needs --context C (tokens already in the KV cache)")
    if args.phase == "prefill" and prompt is None:
        raise EffLLMError("--phase prefill needs --prompt P (or --context P)")
    report = analyze(
        _model(args),
        args.hardware,
        args.phase,
        args.batch,
        prompt=prompt,
        context=context,
        output=output,
        **_bits(args),
        kv_bits=_kv_bits(args),
        fused_attention=not args.unfused_attention,
        sparsity=args.sparsity,
    )
    text = format_roofline(report)
    data = report.to_dict()
    if args.plot:
        from effllm.analyze.plot import plot_roofline

        data["plot"] = str(plot_roofline(report, args.plot))
        text += f"\nplot: {data['plot']}"
    return _emit(args, data, text)


# ---------------------------------------------------------------------- hardware
def _add_hardware(sub) -> None:
    p = sub.add_parser("hardware", help="measure this machine (bandwidth, matmul FLOP/s) or list the table")
    p.add_argument(
        "--list", action="store_true", help="list built-in and saved hardware instead of measuring"
    )
    p.add_argument("--device", default="cpu", help="device to measure: cpu (default), cuda, cuda:N")
    p.add_argument("--name", default=None, help="name to save under (default: local, or local-cuda)")
    p.add_argument(
        "--copy-mib",
        type=int,
        default=1024,
        help="size of the streamed copy and read (MiB), well above the last-level cache",
    )
    p.add_argument("--matmul-n", type=int, default=2048, help="square matmul size")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the best is kept")
    p.add_argument("--file", default=None, help=f"hardware file (default {hardware_file()})")
    p.add_argument("--no-save", action="store_true", help="measure without saving")
    _add_json(p)
    p.set_defaults(func=run_hardware)


def run_hardware(args: argparse.Namespace) -> int:
    if args.list:
        entries = list_hardware()
        return _emit(args, {name: hw.to_dict() for name, hw in entries.items()}, format_hardware(entries))
    hw = measure_hardware(args.device, args.copy_mib, args.matmul_n, args.repeats, args.name)
    text = format_hardware({hw.name: hw})
    data = hw.to_dict()
    if not args.no_save:
        data["saved_to"] = str(save_hardware(hw, args.file))
        text += f"\nsaved to {data['saved_to']} as {hw.name!r}"
    return _emit(args, data, text)


# ---------------------------------------------------------------------- memory
def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="memory to serve (weights, KV cache, activations) or to train")
    _add_model(p)
    p.add_argument("--mode", choices=("inference", "training"), default="inference")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--context",
        "--seq-len",
        dest="context",
        type=int,
        default=2048,
        help="context (inference) or sequence length (training), default 2048",
    )
    _add_bits(p, a_default="16; training: --param-bits")
    p.add_argument(
        "--step-tokens",
        type=int,
        default=None,
        help="inference: tokens per forward step (default batch x context, one-shot prefill)",
    )
    p.add_argument(
        "--optimizer",
        choices=list(list_optimizers()),
        default="adamw",
        help="training: an optimizer name, as effllm train --optimizer takes it (default adamw)",
    )
    p.add_argument(
        "--optimizer-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="training: its options, as effllm train takes them (e.g. momentum=0.9 history_size=10)",
    )
    p.add_argument("--rank", type=int, default=128, help="GaLore rank")
    p.add_argument("--param-bits", type=int, default=32, help="training: parameter bits (default 32)")
    p.add_argument("--grad-bits", type=int, default=None, help="training: gradient bits (default param bits)")
    p.add_argument(
        "--state-bits",
        type=int,
        default=None,
        choices=(8, 16, 32),
        help="optimizer state bits (8: bitsandbytes block-wise; default param bits)",
    )
    p.add_argument(
        "--checkpointing", action="store_true", help="training: activation checkpointing per layer"
    )
    p.add_argument(
        "--layerwise-update",
        action="store_true",
        help="training: update each parameter during backward, freeing its gradient",
    )
    p.add_argument("--hardware", default=None, help="say whether the total fits this hardware's memory")
    _add_json(p)
    p.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    model = _model(args)
    config = load_model_config(model)
    if args.mode == "inference":
        result = inference_memory(
            config,
            args.batch,
            args.context,
            **_bits(args),
            kv_bits=_kv_bits(args),
            step_tokens=args.step_tokens,
        )
    else:
        result = training_memory(
            config,
            args.batch,
            args.context,
            optimizer=args.optimizer,
            param_bits=args.param_bits,
            grad_bits=args.grad_bits,
            state_bits=args.state_bits,
            a_bits=args.a_bits,
            rank=args.rank,
            options=parse_key_values(args.optimizer_options, "--optimizer-options"),
            checkpointing=args.checkpointing,
            layerwise_update=args.layerwise_update,
        )
    hw = get_hardware(args.hardware) if args.hardware else None
    data = {"model": str(model), "mode": args.mode, **result.to_dict()}
    if hw is not None and hw.memory_bytes:
        data["hardware"] = hw.name
        data["fits"] = result.total <= hw.memory_bytes
    return _emit(args, data, format_memory(result, hw))


# ---------------------------------------------------------------------- runtime
def _add_runtime(sub) -> None:
    p = sub.add_parser("runtime", help="fit HELM's idealized runtime from measured runs, predict, export")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", help="JSON list or JSONL of {prompt_tokens, output_tokens, runtime_s}")
    source.add_argument("--fitted", help="a runtime model JSON saved earlier (or a HELM runtimes file)")
    p.add_argument("--name", default=None, help="model name: the key in a HELM-style file")
    p.add_argument("--denoise", action="store_true", help="separate a fixed per-request overhead")
    p.add_argument("--out", default=None, help="write the fitted model (JSON) here")
    p.add_argument(
        "--predict",
        nargs=2,
        type=int,
        action="append",
        default=[],
        metavar=("PROMPT", "OUTPUT"),
        help="predict the runtime of a request (repeatable)",
    )
    _add_json(p)
    p.set_defaults(func=run_runtime)


def run_runtime(args: argparse.Namespace) -> int:
    if args.runs:
        model = fit_runtime_model(load_runs(args.runs), denoise=args.denoise)
    else:
        model = RuntimeModel.load(args.fitted, args.name)
    predictions = [
        {"prompt_tokens": p, "output_tokens": o, "runtime_s": model.predict(p, o)} for p, o in args.predict
    ]
    data: dict[str, Any] = {"model": model.to_dict(), "predictions": predictions}
    text = format_runtime(model)
    text += "".join(
        f"\npredict p={r['prompt_tokens']} o={r['output_tokens']}: {r['runtime_s']:.4g} s"
        for r in predictions
    )
    if args.out:
        data["saved_to"] = str(model.save(args.out, args.name))
        text += f"\nsaved to {data['saved_to']}"
    return _emit(args, data, text)
