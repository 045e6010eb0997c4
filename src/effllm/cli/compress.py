"""`effllm compress quantize`: quantize a checkpoint's linear layers and write it in compressed-tensors.

    effllm compress quantize --model M --scheme w4a16 --method gptq --group-size 32 --out DIR
    effllm compress quantize --model M --scheme w4a8kv4 --out DIR     # QoQ; serve it with the int4 KV cache

QoQ's schemes (w4a8, w4a8kv4) have no compressed-tensors name: they are written in EffLLM's own
`quantization_config` (docs/compression.md), which only EffLLM loads.

It ends with a report: weight bytes before and after, held-out perplexity (*Persuasion*) before and after,
and batch-1 decode tokens/s before and after with its fraction of this machine's memory roofline
(`--no-report` skips the measurements). The output folder loads in `effllm generate`, `serve`, `eval`,
`bench` and `analyze` like any checkpoint, and in vLLM and llm-compressor (compressed-tensors).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effllm.core.errors import InputError

QOQ_SCHEMES = ("w4a8", "w4a8kv4")  # QoQ's: their own steps' flags, EffLLM's own format


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="quantize or prune a model (compressed-tensors checkpoints)",
        description="Model compression.",
    )
    sub = p.add_subparsers(
        dest="compress_command", metavar="{quantize,palettize,prune,merge-lora,import-gguf}", required=True
    )
    m = sub.add_parser(
        "merge-lora",
        help="fold a LoRA adapter (PEFT layout) into its base model: one ordinary checkpoint",
        description="W += scale * B @ A for every adapted projection of the base; the result loads anywhere "
        "the base does (transformers too). The base must be dense (merge into the unquantized model).",
    )
    m.add_argument(
        "--model", default=None, help="the base checkpoint (default: the adapter's base_model_name_or_path)"
    )
    m.add_argument(
        "--adapter", required=True, help="the adapter folder (adapter_config.json, adapter_model.safetensors)"
    )
    m.add_argument("--out", required=True, help="folder of the merged model")
    m.add_argument("--dtype", default=None, help="dtype of the merged model (default: the base's)")
    m.set_defaults(func=run_merge_lora)
    g = sub.add_parser(
        "import-gguf",
        help="convert a llama GGUF file (llama.cpp) into a checkpoint folder EffLLM runs",
        description="Q4_0 layers stay 4-bit (groups of 32); F32/F16/BF16/Q8_0/Q4_1 and other types are "
        "dequantized to --dtype. The byte-level BPE tokenizer is rebuilt from the file.",
    )
    g.add_argument("file", help="the .gguf file")
    g.add_argument("--out", required=True, help="folder to write (must not exist)")
    g.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of dense layers and scales (default bfloat16)",
    )
    g.set_defaults(func=run_import_gguf)
    q = sub.add_parser(
        "quantize",
        help="quantize the linear layers (W8A16, W4A16, W8A8, QoQ's W4A8 and W4A8KV4; RTN, GPTQ, AWQ, SmoothQuant)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    q.add_argument(
        "--out", required=True, help="folder to write the quantized checkpoint to (must not exist)"
    )
    q.add_argument(
        "--scheme",
        required=True,
        choices=["w8a16", "w4a16", "w8a8", *QOQ_SCHEMES],
        help="w8a16: int8 weights per channel; w4a16: int4 weights in groups; w8a8: int8 weights "
        "per channel and int8 activations per token (dynamic); w4a8: QoQ (QServe) progressive 4-bit weights "
        "and int8 activations; w4a8kv4: w4a8 with SmoothAttention and an int4 KV cache",
    )
    q.add_argument(
        "--method",
        default=None,
        choices=["rtn", "gptq", "awq", "smoothquant"],
        help="rtn (no data), gptq, awq (weight-only schemes), smoothquant (w8a8); default rtn, gptq for w4a8*",
    )
    q.add_argument(
        "--group-size",
        type=int,
        default=None,
        choices=[32, 64, 128],
        help="w4a16 / w4a8 group size (default 32 / 128)",
    )
    qoq = q.add_argument_group("QoQ steps (w4a8, w4a8kv4), each switchable for an ablation")
    qoq.add_argument(
        "--no-rotate", dest="rotate", action="store_false", help="no Hadamard rotation of block inputs"
    )
    qoq.add_argument(
        "--no-smooth-linear",
        dest="smooth_linear",
        action="store_false",
        help="no SmoothLinear (alpha: --alpha)",
    )
    qoq.add_argument(
        "--no-smooth-attention",
        dest="smooth_attention",
        action="store_false",
        default=None,
        help="no SmoothAttention (on for w4a8kv4)",
    )
    qoq.add_argument(
        "--smooth-attention",
        dest="smooth_attention",
        action="store_true",
        help="SmoothAttention also for w4a8",
    )
    qoq.add_argument(
        "--clip", action="store_true", help="search each channel's weight range (shrink 1.0 to 0.8)"
    )
    q.add_argument("--asymmetric", action="store_true", help="w4a16: asymmetric grid with zero points")
    q.add_argument(
        "--skip",
        default="lm_head",
        help="comma-separated linear names (or re:PATTERN) left dense (default lm_head; '' for none)",
    )
    q.add_argument(
        "--format",
        default="compressed-tensors",
        choices=["compressed-tensors", "gguf"],
        help="compressed-tensors (default: a Hugging Face folder every EffLLM command, vLLM and llm-compressor "
        "load) or gguf (OUT/model.gguf for llama.cpp: w4a16 --group-size 32 as Q4_0/Q4_1, w8a16 as Q8_0; "
        "needs pip install gguf)",
    )
    q.add_argument(
        "--calibration-data",
        default=None,
        help="text or jsonl file for gptq/awq/smoothquant (default: the shipped training books)",
    )
    q.add_argument("--num-samples", type=int, default=64, help="calibration samples (default 64)")
    q.add_argument(
        "--calibration-seq-len", type=int, default=256, help="tokens per calibration sample (default 256)"
    )
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (default 0.01)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    q.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="SmoothQuant / SmoothLinear migration strength (default 0.5, QoQ 0.3)",
    )
    q.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of scales and the dense layers (default: the checkpoint's)",
    )
    q.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="skip the perplexity and speed measurements of the report",
    )
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=run_quantize)
    _register_palettize(sub)
    _register_prune(sub)


def _report_args(parser, skipped: str) -> None:
    """--dtype, --no-report (what it skips) and --json, as every compress command takes them."""
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    parser.add_argument("--no-report", dest="report", action="store_false", help=f"skip {skipped}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _new_folder(out: str) -> Path:
    path = Path(out)
    if path.exists():
        raise InputError(f"{path} already exists; pass a new --out folder")
    return path


def _register_palettize(sub) -> None:
    pa = sub.add_parser(
        "palettize",
        help="k-means palettization: each matrix as 2^bits values plus a bits-bit index per weight",
        description="Post-training palettization (coremltools' k-means palettizer): every linear but --skip "
        "becomes a palette of 2^bits values (per matrix, or per --rows-per-palette output rows) and a "
        "bits-bit index per weight, stored as bit planes (EffLLM's `palettized` layout, docs/compression.md) "
        "and run by the lookup-table kernel. DKM (`effllm train --method dkm`) learns the palettes in "
        "training and writes the same layout. Ends with the report of `compress quantize`.",
    )
    pa.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    pa.add_argument(
        "--out", required=True, help="folder to write the palettized checkpoint to (must not exist)"
    )
    pa.add_argument(
        "--bits", type=int, default=4, choices=range(1, 9), metavar="{1..8}", help="index bits (default 4)"
    )
    pa.add_argument(
        "--rows-per-palette",
        type=int,
        default=None,
        help="output rows sharing one palette (coremltools' per_grouped_channel group_size; default: one per matrix)",
    )
    pa.add_argument(
        "--skip",
        default="lm_head",
        help="comma-separated linear names (or re:PATTERN) left dense (default lm_head)",
    )
    pa.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    _report_args(pa, "the perplexity and speed measurements")
    pa.set_defaults(func=run_palettize)


def run_palettize(args: argparse.Namespace) -> int:
    from effllm.compress.palettize import palettize_
    from effllm.compress.sizes import resident_bytes
    from effllm.models import load_model, load_tokenizer, save_model
    from effllm.models.default import default_model_path

    out = _new_folder(args.out)
    if args.rows_per_palette is not None and args.rows_per_palette < 1:
        raise InputError(f"--rows-per-palette must be a positive number of rows, got {args.rows_per_palette}")
    path = args.model or str(default_model_path())
    model = load_model(path, dtype=args.dtype, device="cpu")
    if model.config.effllm.get("compression") or model.config.quantization_config:
        raise InputError(f"{path} is already compressed; palettize the dense checkpoint")
    tokenizer = load_tokenizer(path)
    before = _measure(model, tokenizer) if args.report else {}
    bytes_before = resident_bytes(model)
    start = time.perf_counter()
    palettize_(
        model, args.bits, args.rows_per_palette, [s for s in args.skip.split(",") if s], seed=args.seed
    )
    seconds = time.perf_counter() - start
    save_model(model, out, tokenizer=tokenizer)
    report = {
        "model": path,
        "out": str(out),
        "scheme": f"palettized {args.bits}-bit",
        "method": "k-means"
        + (f", a palette per {args.rows_per_palette} rows" if args.rows_per_palette else ""),
        "bits": args.bits,
        "rows_per_palette": args.rows_per_palette,
        "quantize_seconds": round(seconds, 2),
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": resident_bytes(model),
        "format": "palettized",
        "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }
    return _finish_report(args, report, model, tokenizer, before)


def _register_prune(sub) -> None:
    from effllm.compress.prune import PRUNE_METHODS

    pr = sub.add_parser(
        "prune",
        help="one-shot pruning of the linear layers: magnitude, Wanda, SparseGPT; unstructured or N:M",
        description="Zero a share of every decoder linear's weights (effllm.compress.prune) and write the "
        "model (dense, with exact zeros). Reports the held-out perplexity (Persuasion) before and after.",
    )
    pr.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    pr.add_argument("--out", required=True, help="folder to write the pruned checkpoint to (must not exist)")
    pr.add_argument(
        "--method",
        required=True,
        choices=[*PRUNE_METHODS, "llm-pruner"],
        help="one-shot zeros (magnitude, wanda, sparsegpt) or llm-pruner: whole MLP channels and KV groups "
        "removed, a smaller dense checkpoint (effllm.compress.structured)",
    )
    pr.add_argument(
        "--ratio",
        type=float,
        default=0.25,
        help="llm-pruner: share of each layer's MLP channels removed (0.25)",
    )
    pr.add_argument(
        "--kv-group-ratio",
        type=float,
        default=0.0,
        help="llm-pruner: share of each layer's KV groups removed with their q heads (a multiple of 1/KV; 0)",
    )
    pr.add_argument(
        "--importance", default="first", choices=["first", "second", "mix"], help="llm-pruner: Taylor order"
    )
    pr.add_argument(
        "--sparsity", type=float, default=0.5, help="share of each matrix zeroed, unstructured (default 0.5)"
    )
    pr.add_argument(
        "--pattern",
        default="unstructured",
        help="unstructured (default) or N:M, N zeros in every M inputs (2:4, 4:8)",
    )
    pr.add_argument(
        "--calibration-data", default=None, help="text or jsonl file (default: the shipped training books)"
    )
    pr.add_argument("--num-samples", type=int, default=64, help="calibration samples (default 64)")
    pr.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per sample (default 256)")
    pr.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening (default 0.01)")
    _report_args(pr, "the perplexities")
    pr.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from effllm.compress import calibration_ids
    from effllm.compress.prune import Pattern, prune_
    from effllm.models import load_model, load_tokenizer, save_model
    from effllm.models.default import default_model_path

    out = _new_folder(args.out)
    pattern = Pattern.parse(args.pattern)
    structured = args.method == "llm-pruner"
    path = args.model or str(default_model_path())
    model = load_model(path, dtype=args.dtype, device="cpu")
    tokenizer = load_tokenizer(path)
    before = _heldout_perplexity(model, tokenizer) if args.report else None
    ids = None
    if args.method != "magnitude":
        ids = calibration_ids(tokenizer, args.num_samples, args.calibration_seq_len, args.calibration_data)
    params_before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if structured:
        from effllm.compress.structured import prune_structured

        model = prune_structured(model, ids, args.ratio, args.kv_group_ratio, args.importance)
        zeros = {}
    else:
        zeros = prune_(model, args.method, args.sparsity, pattern, calibration=ids, damp=args.damp)
    seconds = time.perf_counter() - start
    save_model(model, out, tokenizer=tokenizer)
    report = {
        "model": path,
        "out": str(out),
        "method": args.method,
        "prune_seconds": round(seconds, 2),
        "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
    }
    if structured:
        c = model.config
        report.update(ratio=args.ratio, kv_group_ratio=args.kv_group_ratio, importance=args.importance)
        report.update(intermediate_size=c.intermediate_size, num_key_value_heads=c.num_key_value_heads)
    else:
        report.update(
            pattern=args.pattern, sparsity=args.sparsity if not pattern.structured else pattern.n / pattern.m
        )
        report["linear_zero_share"] = round(sum(zeros.values()) / len(zeros), 4)
    if args.report:
        after = _heldout_perplexity(model, tokenizer)
        report.update(perplexity_before=before, perplexity_after=after)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if structured:
        print(
            f"wrote {out}: llm-pruner, {report['parameters_before'] / 1e6:.2f}M -> "
            f"{report['parameters_after'] / 1e6:.2f}M parameters (intermediate {report['intermediate_size']}, "
            f"{report['num_key_value_heads']} KV heads), in {report['prune_seconds']} s"
        )
    else:
        print(
            f"wrote {out}: {args.method} {args.pattern}, {report['linear_zero_share']:.1%} of the decoder "
            f"linears' weights zero, in {report['prune_seconds']} s"
        )
    if args.report:
        change = 100 * (report["perplexity_after"] / report["perplexity_before"] - 1)
        print(
            f"  perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f} ({change:+.1f}%, "
            "held-out Persuasion, first 20,000 words, per token)"
        )
    return 0


def _heldout_perplexity(model, tokenizer) -> float:
    from effllm.eval.corpus import heldout_text
    from effllm.eval.perplexity import perplexity

    text = " ".join(heldout_text().split(" ")[:20000])
    return round(perplexity(model, tokenizer, text, batch_size=8).token_perplexity, 3)


def run_merge_lora(args: argparse.Namespace) -> int:
    from effllm.models import load_model, load_tokenizer, save_model
    from effllm.models.hub import resolve_model_path
    from effllm.models.lora import merge_lora
    from effllm.models.peft_adapter import adapter_base_model, load_adapter

    base = args.model or adapter_base_model(args.adapter)
    if not base:
        raise InputError(f"{args.adapter} names no base model; pass --model")
    model = load_model(base, dtype=args.dtype, device="cpu")
    config = load_adapter(model, args.adapter)
    count = merge_lora(model)
    tokenizer = load_tokenizer(base) if (resolve_model_path(base) / "tokenizer.json").is_file() else None
    save_model(model, args.out, tokenizer=tokenizer)
    print(f"merged {count} adapters (rank {config.rank}) of {args.adapter} into {base}: wrote {args.out}")
    return 0


def run_import_gguf(args: argparse.Namespace) -> int:
    import torch

    from effllm.compress.gguf_import import import_gguf

    out = import_gguf(args.file, args.out, getattr(torch, args.dtype))
    print(f"wrote {out} from {args.file}")
    return 0


def make_config(args: argparse.Namespace):
    from effllm.compress import SCHEMES

    cls = SCHEMES[args.scheme]
    options = {"skip": [s for s in args.skip.split(",") if s], "damp": args.damp, "act_order": args.act_order}
    for name in ("method", "alpha", "group_size"):  # None: the scheme's default
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.scheme == "w4a16":
        options["symmetric"] = not args.asymmetric
    elif args.group_size is not None and args.scheme not in QOQ_SCHEMES:
        raise InputError(f"--group-size applies to w4a16, w4a8 and w4a8kv4, not {args.scheme}")
    if args.scheme in QOQ_SCHEMES:
        options.update(rotate=args.rotate, smooth_linear=args.smooth_linear, clip=args.clip)
        if args.smooth_attention is not None:
            options["smooth_attention"] = args.smooth_attention
    elif not (args.rotate and args.smooth_linear and args.smooth_attention is None and not args.clip):
        raise InputError(
            "--no-rotate, --no-smooth-linear, --[no-]smooth-attention and --clip apply to w4a8 and w4a8kv4"
        )
    return cls(**options)


def run_quantize(args: argparse.Namespace) -> int:

    from effllm.compress import calibration_ids, quantize_
    from effllm.compress.sizes import resident_bytes
    from effllm.models import load_model, load_tokenizer, save_model
    from effllm.models.default import default_model_path

    out = _new_folder(args.out)
    config = make_config(args)
    config.check()
    if args.format == "gguf" and not (
        args.scheme == "w8a16" or (args.scheme == "w4a16" and config.group_size == 32)
    ):
        raise InputError(
            "GGUF blocks hold 32 weights: choose --scheme w4a16 --group-size 32 or --scheme w8a16"
        )
    if args.format == "gguf":
        from effllm.compress.gguf_export import require_gguf

        require_gguf()  # the package must be there before any work is done
    path = args.model or str(default_model_path())
    model = load_model(path, dtype=args.dtype, device="cpu")
    tokenizer = load_tokenizer(path)
    if args.format == "gguf":
        from effllm.compress.gguf_export import check_tokenizer

        check_tokenizer(tokenizer)
    before = _measure(model, tokenizer) if args.report else {}
    bytes_before = resident_bytes(model)
    ids = None
    if config.needs_calibration():
        ids = calibration_ids(tokenizer, args.num_samples, args.calibration_seq_len, args.calibration_data)
    start = time.perf_counter()
    quantize_(model, config, calibration=ids)
    seconds = time.perf_counter() - start
    if args.format == "gguf":
        from effllm.compress.gguf_export import export_gguf

        export_gguf(model, tokenizer, out / "model.gguf")
    else:
        save_model(model, out, tokenizer=tokenizer)
    report = {
        "model": path,
        "out": str(out),
        "scheme": args.scheme,
        "method": config.method,
        "group_size": getattr(config, "group_size", None),
        "quantize_seconds": round(seconds, 2),
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": resident_bytes(model),
        "format": "qoq" if args.scheme in QOQ_SCHEMES else args.format,
        "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))
        + sum(f.stat().st_size for f in out.glob("*.gguf")),
    }
    return _finish_report(args, report, model, tokenizer, before)


def _finish_report(args: argparse.Namespace, report: dict, model, tokenizer, before: dict) -> int:
    """The compressed model's measurements (unless --no-report) beside `before`'s, printed or as JSON."""
    if args.report:
        after = _measure(model, tokenizer)
        report.update({f"{k}_before": v for k, v in before.items()})
        report.update({f"{k}_after": v for k, v in after.items()})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _measure(model, tokenizer) -> dict:
    """Held-out perplexity (first 20,000 words of Persuasion) and batch-1 decode speed with its roofline share."""
    import torch

    from effllm.analyze.hardware import measure_hardware
    from effllm.bench.generate import _effllm_run
    from effllm.bench.generate import _measure as measure_run
    from effllm.compress.sizes import streamed_bytes
    from effllm.engine.config import EngineConfig
    from effllm.engine.kv_cache import resolve_kv_bits
    from effllm.engine.llm_engine import LLMEngine
    from effllm.models.kv_round_trip import with_kv_round_trip

    kv_bits = resolve_kv_bits("auto", model.config)  # a w4a8kv4 model is scored with its int4 cache
    scored = model if kv_bits is None else with_kv_round_trip(model, kv_bits)
    ppl = _heldout_perplexity(scored, tokenizer)
    prompt = torch.randint(
        0, model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    engine = LLMEngine(model, config=EngineConfig(enable_prefix_caching=False))
    speed = measure_run(_effllm_run, engine, prompt, 64, 1)
    del engine
    bandwidth = measure_hardware(copy_mib=256, matmul_n=256, repeats=3).bandwidth
    tok_s = speed["decode_tokens_per_s"]
    return {
        "perplexity": ppl,
        "decode_tokens_per_s": round(tok_s, 2),
        "decode_fraction_of_roofline": round(tok_s * streamed_bytes(model) / bandwidth, 3),
    }


def _print_report(r: dict) -> None:
    mb = 1e6
    print(f"wrote {r['out']}: {r['scheme']} ({r['method']}) in {r['quantize_seconds']} s")
    print(
        f"  weights     {r['weight_bytes_before'] / mb:8.1f} MB -> {r['weight_bytes_after'] / mb:8.1f} MB "
        f"({r['weight_bytes_after'] / r['weight_bytes_before']:.2f}x); checkpoint {r['checkpoint_bytes'] / mb:.1f} MB"
    )
    if "perplexity_before" in r:
        change = 100 * (r["perplexity_after"] / r["perplexity_before"] - 1)
        print(
            f"  perplexity  {r['perplexity_before']:8.3f}    -> {r['perplexity_after']:8.3f}    ({change:+.2f}%, "
            "held-out Persuasion, first 20,000 words, per token)"
        )
        print(
            f"  decode      {r['decode_tokens_per_s_before']:8.1f} tok/s -> {r['decode_tokens_per_s_after']:8.1f} tok/s "
            f"({r['decode_tokens_per_s_after'] / r['decode_tokens_per_s_before']:.2f}x; batch 1, 256-token prompt; "
            f"{100 * r['decode_fraction_of_roofline_before']:.0f}% -> "
            f"{100 * r['decode_fraction_of_roofline_after']:.0f}% of the memory roofline)"
        )
