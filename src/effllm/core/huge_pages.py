"""Transparent huge pages for tensors the CPU streams through every step: the weights and the KV cache.

A decode step reads every weight once, so its speed is the memory system's read bandwidth; with 4 KiB pages
a 500 MB model spans 130,000 pages, each a TLB miss (in a virtual machine, a two-level page walk). Backed by
2 MiB pages the same read is faster: on the 2-vCPU Sapphire Rapids VM of docs/benchmarks.md, a two-thread
AVX-512 read of 538 MB went from 23.5 to 29 GB/s. Linux makes a region huge on request
(`madvise(MADV_HUGEPAGE)`, honoured when /sys/kernel/mm/transparent_hugepage/enabled is `always` or
`madvise`): `advise` asks it for memory not yet touched (its first faults then take 2 MiB pages), `collapse`
also moves memory already written into huge pages in place (`MADV_COLLAPSE`, Linux 6.1+), same addresses,
so every view and pointer stays valid. Both round each tensor's bytes out to 2 MiB boundaries (a huge page
cannot be smaller) and are best-effort: where the kernel refuses, memory stays as it was and results are
unchanged; only the speed differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def available() -> bool:
    """Whether this system hands out transparent huge pages on request (Linux, mode `always` or `madvise`)."""
    if _libc() is None:
        return False
    try:
        mode = _MODE.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned address ranges covering the storages of `tensors` (CPU, at least one huge page in
    size), overlapping ones merged."""
    spans = []
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
            continue
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if start == 0 or size < HUGE_PAGE:
            continue
        spans.append((start // HUGE_PAGE * HUGE_PAGE, -(-(start + size) // HUGE_PAGE) * HUGE_PAGE))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _madvise(ranges: list[tuple[int, int]], advice: int) -> int:
    """madvise each huge page of the ranges on its own; the bytes the kernel took. One call per page: a page
    rounded out into a neighbouring mapping that cannot take the advice (a guard region, a library) fails
    alone, where one call for the whole range would stop there. ENOMEM (part of the page unmapped) counts
    as taken for MADV_HUGEPAGE, whose advice still applies to the mapped part."""
    libc, done = _libc(), 0
    for start, end in ranges:
        for page in range(start, end, HUGE_PAGE):
            if libc.madvise(page, HUGE_PAGE, advice) == 0 or (
                advice == MADV_HUGEPAGE and ctypes.get_errno() == errno.ENOMEM
            ):
                done += HUGE_PAGE
    return done


def advise(tensors: Iterable[torch.Tensor]) -> int:
    """Ask for huge pages behind `tensors`' memory from its next page faults on (call it before first writing
    a fresh `torch.empty`); returns the bytes advised (0 where huge pages are unavailable)."""
    if not available():
        return 0
    return _madvise(_ranges(tensors), MADV_HUGEPAGE)


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Move `tensors`' memory, already written, into huge pages in place (and keep it eligible for them);
    returns the bytes collapsed (0 where huge pages or MADV_COLLAPSE are unavailable)."""
    if not available():
        return 0
    ranges = _ranges(tensors)
    _madvise(ranges, MADV_HUGEPAGE)
    return _madvise(ranges, MADV_COLLAPSE)


def huge_bytes(tensor: torch.Tensor) -> int:
    """Bytes in huge pages of the memory mappings that hold `tensor`'s storage (their AnonHugePages in
    /proc/self/smaps; 0 where unknown): how a test or a user checks that `collapse` or `advise` took effect.
    A mapping can be wider than the tensor, so this is at most an upper bound on the tensor's own share."""
    storage = tensor.untyped_storage()
    first, last = storage.data_ptr(), storage.data_ptr() + max(storage.nbytes(), 1)
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside, total = False, 0
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:  # a mapping's header: "start-end perms ..."
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start < last and first < end
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total
