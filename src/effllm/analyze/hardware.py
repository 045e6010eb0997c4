"""The hardware a roofline is drawn for: memory bandwidth and peak matmul rate per number format.

Built-in entries are vendor datasheet figures, dense (no 2:4 sparsity). `measure_hardware` measures the
machine it runs on (bandwidth by a streaming copy or a read-only pass, whichever is faster; matmul FLOP/s
through torch); `save_hardware` keeps the result in a JSON file so that later runs can name it ("local").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effllm.core.errors import ConfigError, EffLLMError

# Operand width of each number format a peak is listed for.
FORMAT_BITS = {"int4": 4, "int8": 8, "bf16": 16, "fp32": 32}

HARDWARE_FILE_ENV = "EFFLLM_HARDWARE_FILE"


@dataclass(frozen=True)
class Hardware:
    """One machine: bandwidth in bytes/s, dense matmul peaks in FLOP/s (or OP/s) per number format.

    `peak_flops` keys are FORMAT_BITS names; "bf16" stands for 16-bit floats (bf16 and fp16 run at the
    same rate on every listed GPU, with fp32 accumulation as torch uses).
    """

    name: str
    bandwidth: float
    peak_flops: dict[str, float]
    memory_bytes: float | None = None
    source: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.peak_flops) - set(FORMAT_BITS)
        if unknown:
            raise ConfigError(
                f"hardware {self.name!r}: unknown formats {sorted(unknown)}; use {list(FORMAT_BITS)}"
            )
        if self.bandwidth <= 0 or not self.peak_flops or min(self.peak_flops.values()) <= 0:
            raise ConfigError(
                f"hardware {self.name!r} needs a positive bandwidth and at least one positive peak"
            )

    def peak_for_bits(self, bits: float) -> float:
        """Best matmul rate for operands `bits` wide: the fastest listed format at least that wide.

        A format missing from the table (int4 on Hopper, bf16 on Apple GPUs) falls back to a wider one,
        as a kernel would compute in it; a wider format that happens to be faster (fp32 on a CPU without
        bf16 units) is the limit too.
        """
        rates = [rate for fmt, rate in self.peak_flops.items() if FORMAT_BITS[fmt] >= bits]
        if not rates:
            raise ConfigError(f"hardware {self.name!r} lists no matmul peak for {bits:g}-bit operands")
        return max(rates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        try:
            return cls(
                name=str(d["name"]),
                bandwidth=float(d["bandwidth"]),
                peak_flops={str(k): float(v) for k, v in d["peak_flops"].items()},
                memory_bytes=None if d.get("memory_bytes") is None else float(d["memory_bytes"]),
                source=str(d.get("source", "")),
                measured=dict(d.get("measured") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"hardware entry is malformed ({type(e).__name__}: {e}); it needs name, bandwidth (bytes/s) "
                "and peak_flops ({format: FLOP/s})"
            ) from None


HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            "h100-sxm",
            3.35e12,
            {"fp32": 67e12, "bf16": 989.4e12, "int8": 1978.9e12},
            80e9,
            "NVIDIA H100 SXM5 80GB datasheet; no int4 tensor cores",
        ),
        Hardware(
            "h200",
            4.8e12,
            {"fp32": 67e12, "bf16": 989.4e12, "int8": 1978.9e12},
            141e9,
            "NVIDIA H200 SXM datasheet",
        ),
        Hardware(
            "a100-40g",
            1.555e12,
            {"fp32": 19.5e12, "bf16": 312e12, "int8": 624e12, "int4": 1248e12},
            40e9,
            "NVIDIA A100 SXM4 40GB datasheet",
        ),
        Hardware(
            "a100-80g",
            2.039e12,
            {"fp32": 19.5e12, "bf16": 312e12, "int8": 624e12, "int4": 1248e12},
            80e9,
            "NVIDIA A100 SXM4 80GB datasheet",
        ),
        Hardware(
            "l40s",
            864e9,
            {"fp32": 91.6e12, "bf16": 362.05e12, "int8": 733e12, "int4": 733e12},
            48e9,
            "NVIDIA L40S datasheet",
        ),
        Hardware(
            "rtx4090",
            1008e9,
            {"fp32": 82.6e12, "bf16": 165.2e12, "int8": 660.6e12, "int4": 1321.2e12},
            24e9,
            "NVIDIA Ada whitepaper; bf16 with fp32 accumulation (330.3 TF with fp16 accumulation)",
        ),
        Hardware(
            "a6000",
            768e9,
            {"fp32": 38.7e12, "bf16": 154.8e12, "int8": 309.7e12, "int4": 619.4e12},
            48e9,
            "NVIDIA RTX A6000 datasheet",
        ),
        Hardware(
            "m2-ultra",
            800e9,
            {"fp32": 27.2e12},
            192e9,
            "Apple M2 Ultra, 76-core GPU; fp16 runs at the fp32 rate, Neural Engine not counted",
        ),
    )
}

_ALIASES = {
    "h100": "h100-sxm",
    "h100sxm": "h100-sxm",
    "a100": "a100-80g",
    "a100-80gb": "a100-80g",
    "a100-40gb": "a100-40g",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "rtx-a6000": "a6000",
    "m2ultra": "m2-ultra",
    "apple-m2-ultra": "m2-ultra",
}


def _normalise(name: str) -> str:
    key = "-".join(name.strip().lower().replace("_", " ").split())
    return _ALIASES.get(key, key)


# ---------------------------------------------------------------------- saved measurements
def hardware_file() -> Path:
    """Where measured hardware is kept: $EFFLLM_HARDWARE_FILE, else the user cache folder."""
    if os.environ.get(HARDWARE_FILE_ENV):
        return Path(os.environ[HARDWARE_FILE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "effllm" / "hardware.json"


def load_saved_hardware(path: str | os.PathLike | None = None) -> dict[str, Hardware]:
    """Every entry of a saved hardware file (empty when there is none)."""
    path = Path(path) if path is not None else hardware_file()
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e.msg}); delete it and rerun `effllm analyze hardware`"
        ) from None
    entries = raw.get("hardware", raw) if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path} must hold {{'hardware': {{name: entry}}}}")
    if "name" in entries and "bandwidth" in entries:  # a single entry on its own
        entries = {entries["name"]: entries}
    return {name: Hardware.from_dict({**entry, "name": name}) for name, entry in entries.items()}


def save_hardware(hardware: Hardware, path: str | os.PathLike | None = None) -> Path:
    """Add (or replace) one entry in the saved hardware file; written atomically."""
    if _normalise(hardware.name) in HARDWARE:
        raise ConfigError(
            f"{hardware.name!r} is a built-in hardware name; save the measurement under another name"
        )
    path = Path(path) if path is not None else hardware_file()
    entries = {name: hw.to_dict() for name, hw in load_saved_hardware(path).items()}
    entries[hardware.name] = hardware.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"hardware": entries}, indent=2) + "\n")
    tmp.replace(path)
    return path


def list_hardware() -> dict[str, Hardware]:
    """Built-in entries, then saved ones."""
    return {**HARDWARE, **load_saved_hardware()}


def get_hardware(name_or_path: str | Hardware) -> Hardware:
    """A built-in or saved entry by name, or the entry held in a JSON file."""
    if isinstance(name_or_path, Hardware):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".json") and Path(text).expanduser().is_file():
        entries = load_saved_hardware(Path(text).expanduser())
        if len(entries) != 1:
            raise ConfigError(f"{text} holds {len(entries)} hardware entries; name one of {sorted(entries)}")
        return next(iter(entries.values()))
    key = _normalise(text)
    if key in HARDWARE:
        return HARDWARE[key]
    saved = load_saved_hardware()
    for candidate in (text, key):
        if candidate in saved:
            return saved[candidate]
    hint = " (run `effllm analyze hardware` to measure this machine)" if key.startswith("local") else ""
    raise ConfigError(
        f"unknown hardware {text!r}{hint}; known: {', '.join(sorted({**HARDWARE, **saved}))}, or a .json file"
    )


# ---------------------------------------------------------------------- measuring this machine
def measure_hardware(
    device: str | None = None,
    copy_mib: int = 1024,
    matmul_n: int = 2048,
    repeats: int = 5,
    name: str | None = None,
) -> Hardware:
    """Measure this machine: bandwidth by a streaming copy and by a read-only pass, fp32 and bf16 matmul
    FLOP/s through torch.

    Each figure is the best of `repeats` timed runs after a warm-up: a roofline is a limit, so the
    fastest run is the one closest to it. A copy moves 2x its size (read + write), as STREAM counts; a
    read-only pass (a sum) is what a decode step does to its weights, and on CPUs where writes are the
    slower half it reads faster. The bandwidth is the better of the two (both in `measured`). On CPU the
    buffers sit on huge pages where Linux gives them, as the engine's weights and KV cache do
    (core/huge_pages.py).
    """
    import torch

    from effllm.core.dtypes import parse_device

    dev = parse_device(device)
    if copy_mib <= 0 or matmul_n <= 0 or repeats <= 0:
        raise EffLLMError("copy size, matmul size and repeats must be positive")

    def best_time(fn) -> float:
        return _best_time(fn, dev, repeats)

    copy_bytes = copy_mib * 2**20
    copy_bandwidth = 2 * copy_bytes / best_time(_copy_fn(copy_bytes, dev))
    read_bandwidth = copy_bytes / best_time(_read_fn(copy_bytes, dev))
    bandwidth = max(copy_bandwidth, read_bandwidth)
    peaks = {
        fmt: 2 * matmul_n**3 / best_time(_matmul_fn(matmul_n, dtype, dev))
        for fmt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }

    if dev.type == "cuda":
        memory = float(torch.cuda.get_device_properties(dev).total_memory)
        what = torch.cuda.get_device_name(dev)
    else:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        what = f"CPU, {torch.get_num_threads()} torch threads"
    return Hardware(
        name=name or ("local" if dev.type == "cpu" else f"local-{dev.type}"),
        bandwidth=bandwidth,
        peak_flops=peaks,
        memory_bytes=memory,
        source=f"measured by effllm analyze hardware on {what}",
        measured={
            "device": str(dev),
            "copy_mib": copy_mib,
            "copy_bandwidth": copy_bandwidth,
            "read_bandwidth": read_bandwidth,
            "matmul_n": matmul_n,
            "repeats": repeats,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def _best_time(fn, dev, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (waiting for the GPU each time)."""
    import torch

    def call() -> None:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-9)


def _buffers(nbytes: int, dev, count: int):
    """`count` float32 buffers of `nbytes`, filled, on huge pages where the OS gives them (CPU)."""
    import torch

    from effllm.core import huge_pages

    out = [torch.empty(nbytes // 4, dtype=torch.float32, device=dev) for _ in range(count)]
    huge_pages.advise(out)  # before the first write: its page faults take 2 MiB pages
    return [t.fill_(1.0) for t in out]


def _copy_fn(nbytes: int, dev):
    src, dst = _buffers(nbytes, dev, 2)
    return lambda: dst.copy_(src)


def _read_fn(nbytes: int, dev):
    (src,) = _buffers(nbytes, dev, 1)
    return lambda: src.sum()


def _matmul_fn(n: int, dtype, dev):
    import torch

    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    return lambda: torch.mm(a, b)
