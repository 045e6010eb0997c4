"""The one helper that turns a shipped `.c` file into a loaded library: compile once, cache, load.

    lib = load_kernel("paged_decode.c", {"paged_decode_f32": ([c_void_p, c_int64, ...], None)})
    if lib is None: ...  # no compiler (or the build failed): take the PyTorch path

The source is a package file next to this one; it may `#include` the package's `.h` files, which are
copied beside it and hashed with it. It is compiled with the system C compiler (`$CC`, else
`cc`) into ~/.cache/effllm/kernels (or $XDG_CACHE_HOME), named by a hash of the source, the flags and
the CPU's features, so a changed source, flag or machine builds anew and concurrent builders never see
a half-written file. `-march=native` lets the compiler use what this CPU has; a kernel that needs a
specific instruction set checks `cpu_features()` before it is chosen. Without a compiler the reason is
logged once, at debug level, and None is returned: every kernel has a PyTorch path beside it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

# The parts of -ffast-math that let reductions vectorise, but not -ffast-math itself: linking a shared
# library with it runs crtfastmath's constructor, which sets flush-to-zero for the whole process (every
# torch kernel then loses subnormals). No -ffinite-math-only either: kernels use -INFINITY.
DEFAULT_FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-freciprocal-math",
    "-fPIC",
    "-shared",
)
Signature = tuple[list, object]  # (argtypes, restype) of one exported function


@cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (`avx512f`, `avx512_vnni`, `amx_tile` ...); empty elsewhere."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def kernel_source(name: str) -> str:
    """The text of a `.c` file shipped in effllm/kernels/cpu."""
    return resources.files("effllm.kernels.cpu").joinpath(name).read_text()


def kernel_headers() -> dict[str, str]:
    """The `.h` files shipped in effllm/kernels/cpu (sources include them by name), name -> text."""
    files = resources.files("effllm.kernels.cpu")
    return {f.name: f.read_text() for f in files.iterdir() if f.name.endswith(".h")}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effllm" / "kernels"


def _compile(name: str, source: str, flags: tuple[str, ...], libs: tuple[str, ...]) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.debug("no C compiler (set $CC or install cc): %s is not built, the PyTorch path is used", name)
        return None
    headers = kernel_headers()
    signature = " ".join(flags + libs) + platform.machine() + " ".join(sorted(cpu_features()))
    text = source + "".join(headers[h] for h in sorted(headers))
    key = hashlib.sha256((text + signature).encode()).hexdigest()[:16]
    target = cache_dir() / f"{Path(name).stem}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / name, Path(tmp) / target.name
        src.write_text(source)
        for header, body in headers.items():
            (Path(tmp) / header).write_text(body)
        result = subprocess.run(
            [compiler, *flags, str(src), "-o", str(out), *libs], capture_output=True, text=True
        )
        if result.returncode != 0:
            log.warning("compiling %s failed, the PyTorch path is used:\n%s", name, result.stderr)
            return None
        os.replace(out, target)  # atomic: concurrent builders each write a whole file
    return target


@cache
def _load(name: str, flags: tuple[str, ...], libs: tuple[str, ...]) -> ctypes.CDLL | None:
    try:
        path = _compile(name, kernel_source(name), flags, libs)
        return None if path is None else ctypes.CDLL(str(path))
    except OSError as e:  # an unwritable cache, a library that will not load
        log.warning("the CPU kernel %s is unavailable (%s); the PyTorch path is used", name, e)
        return None


def load_kernel(
    name: str,
    functions: dict[str, Signature],
    flags: tuple[str, ...] = DEFAULT_FLAGS,
    libs: tuple[str, ...] = ("-lm",),
) -> ctypes.CDLL | None:
    """The compiled library of effllm/kernels/cpu/`name` with `functions` typed, or None without a compiler.

    Built at most once per process and once per machine (the cache); later calls return the same library.
    """
    lib = _load(name, tuple(flags), tuple(libs))
    if lib is None:
        return None
    for fn, (argtypes, restype) in functions.items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = restype
    return lib
