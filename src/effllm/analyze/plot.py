"""The roofline plot: each op as a point (arithmetic intensity, attained FLOP/s) under the machine's roof."""

from __future__ import annotations

import math
import os
from pathlib import Path

from effllm.analyze.roofline import RooflineReport


def plot_roofline(report: RooflineReport, path: str | os.PathLike) -> Path:
    """Write a log-log roofline PNG: one roof per matmul peak in use, one point per op."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # ops at the same spot (q/k/v/o projections at batch 1, the two norms) share one point and label
    groups: dict[tuple[float, float], list[str]] = {}
    for layer in report.layers:
        if layer.cost.ops > 0 and layer.cost.bytes > 0:
            point = (layer.arithmetic_intensity, layer.cost.ops / layer.time_s)
            key = (round(math.log10(point[0]), 2), round(math.log10(point[1]), 2))
            groups.setdefault(key, [point]).append(layer.cost.name)
    bandwidth = report.hardware.bandwidth
    peaks = sorted({layer.peak_flops for layer in report.layers})
    ai_values = [names[0][0] for names in groups.values()] + [peak / bandwidth for peak in peaks]
    lo, hi = min(ai_values) / 4, max(ai_values) * 4

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for peak in peaks:
        ridge = peak / bandwidth
        xs = [lo, ridge, hi] if lo < ridge < hi else [lo, hi]
        ax.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black", linewidth=1)
        ax.annotate(
            f"{peak / 1e12:.3g} TOP/s",
            (hi, peak),
            ha="right",
            va="top",
            fontsize=8,
            xytext=(0, -2),
            textcoords="offset points",
        )
    for (ai, perf), *names in groups.values():
        ax.scatter(ai, perf, s=24, label=", ".join(names), zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (OP/byte)")
    ax.set_ylabel("attained performance (OP/s)")
    b = report.bits
    ax.set_title(
        f"{report.model} on {report.hardware.name}: {report.phase}, batch {report.batch}, "
        f"W{b.w:g}A{b.a:g}KV{b.kv:g} ({bandwidth / 1e9:.4g} GB/s)",
        fontsize=9,
    )
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path = Path(path)
    fig.savefig(path)
    return path
