"""Terminal tables for analyze results (JSON comes from each result's to_dict)."""

from __future__ import annotations

from effllm.analyze.hardware import Hardware
from effllm.analyze.memory import InferenceMemory, TrainingMemory
from effllm.analyze.roofline import RooflineReport, Total
from effllm.analyze.runtime_model import RuntimeModel

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(x: float, unit: str = "") -> str:
    """1.23e9 -> '1.23 G' (+unit)."""
    for scale, prefix in _PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _total_line(label: str, t: Total) -> str:
    return (
        f"{label}: {si(t.ops, 'OP')}, {si(t.bytes, 'B')}, {seconds(t.time_s)} ({t.bound}-bound), "
        f"{t.tokens_per_s:.4g} tokens/s"
    )


def format_roofline(report: RooflineReport) -> str:
    b = report.bits
    shape = {
        "prefill": f"prompt {report.prompt}" + (f" after {report.context} cached" if report.context else ""),
        "decode": f"context {report.context}",
        "generate": f"prompt {report.prompt}, output {report.output}",
    }[report.phase]
    hw = report.hardware
    head = (
        f"{report.model} on {hw.name} ({si(hw.bandwidth, 'B/s')}): {report.phase}, batch {report.batch}, "
        f"{shape}, W{b.w:g}A{b.a:g}KV{b.kv:g}"
        + (f", {report.sparsity} sparse linears (run as N:M hardware does)" if report.sparsity else "")
    )
    total_time = report.total.time_s
    rows = []
    for layer in report.layers:
        c = layer.cost
        ai = layer.arithmetic_intensity
        rows.append(
            [
                c.name,
                str(c.count),
                si(c.ops, "OP"),
                si(c.bytes, "B"),
                "-" if ai == float("inf") else f"{ai:.3g}",
                layer.bound,
                seconds(layer.time_s * c.count),
                f"{100 * layer.time_s * c.count / total_time:.1f}%",
            ]
        )
    table = _table(["op", "count", "ops/each", "bytes/each", "OP/B", "bound", "time (all)", "share"], rows)
    lines = [head, table]
    lines += [_total_line(name, part) for name, part in report.parts.items()]
    lines.append(_total_line("total", report.total))
    return "\n".join(lines)


def format_hardware(entries: dict[str, Hardware]) -> str:
    formats = ("fp32", "bf16", "int8", "int4")
    rows = [
        [
            hw.name,
            si(hw.bandwidth, "B/s"),
            *[si(hw.peak_flops[f], "FLOP/s") if f in hw.peak_flops else "-" for f in formats],
            si(hw.memory_bytes, "B") if hw.memory_bytes else "-",
        ]
        for hw in entries.values()
    ]
    return _table(["hardware", "bandwidth", *formats, "memory"], rows)


def format_memory(result: InferenceMemory | TrainingMemory, hardware: Hardware | None = None) -> str:
    parts = {k: v for k, v in result.to_dict().items() if k not in ("total", "kv_cache_per_token")}
    rows = [[name.replace("_", " "), si(value, "B")] for name, value in parts.items()]
    rows.append(["total", si(result.total, "B")])
    text = _table(["memory", "bytes"], rows)
    if isinstance(result, InferenceMemory):
        text += f"\nKV cache per token of one sequence: {si(result.kv_cache_per_token, 'B')}"
    if hardware is not None and hardware.memory_bytes:
        verdict = "fits" if result.total <= hardware.memory_bytes else "does not fit"
        text += f"\n{verdict} in {hardware.name}'s {si(hardware.memory_bytes, 'B')}"
    return text


def format_runtime(model: RuntimeModel) -> str:
    rows = [[str(p), seconds(f)] for p, f in sorted(model.runtime_for_prompt_tokens.items())]
    text = _table(["prompt tokens", "F(p)"], rows)
    text += f"\nper output token g: {seconds(model.runtime_per_output_token)}"
    if model.overhead is not None:
        text += f"\noverhead: {seconds(model.overhead)}"
    return text
