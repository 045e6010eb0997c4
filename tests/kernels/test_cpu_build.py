"""The kernel build helper: compile a shipped .c file once, cache it by source, flags and CPU, load it."""

import ctypes
import logging

import pytest

from effllm.kernels.cpu import build


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build._load.cache_clear()
    yield tmp_path / "effllm" / "kernels"
    build._load.cache_clear()


SIGNATURE = {"paged_decode_work": ([ctypes.c_int64] * 5, ctypes.c_int64)}


@pytest.mark.skipif(not build.shutil.which("cc"), reason="no C compiler")
def test_a_kernel_is_compiled_once_and_cached_by_source_flags_and_cpu(fresh_cache):
    lib = build.load_kernel("paged_decode.c", SIGNATURE)
    assert lib is not None and 0 < lib.paged_decode_work(2, 4, 8, 100, 1) < lib.paged_decode_work(
        2, 4, 8, 200, 1
    )
    [built] = fresh_cache.glob("paged_decode_*.so")
    assert build.load_kernel("paged_decode.c", SIGNATURE) is lib  # once per process
    build._load.cache_clear()
    build.load_kernel("paged_decode.c", SIGNATURE)
    assert list(fresh_cache.glob("paged_decode_*.so")) == [built]  # once per machine: the cache is reused
    build._load.cache_clear()
    build.load_kernel("paged_decode.c", SIGNATURE, flags=(*build.DEFAULT_FLAGS, "-DEFFLLM_TEST"))
    assert len(list(fresh_cache.glob("paged_decode_*.so"))) == 2  # other flags, another build


@pytest.mark.skipif(not build.shutil.which("cc"), reason="no C compiler")
def test_an_included_header_is_part_of_the_cache_key(fresh_cache, monkeypatch):
    build.load_kernel("paged_decode.c", SIGNATURE)
    headers = build.kernel_headers()
    headers["attention.h"] += "\n/* changed */\n"
    monkeypatch.setattr(build, "kernel_headers", lambda: headers)
    build._load.cache_clear()
    assert build.load_kernel("paged_decode.c", SIGNATURE) is not None
    assert len(list(fresh_cache.glob("paged_decode_*.so"))) == 2


def test_without_a_compiler_the_pytorch_path_is_reported_at_debug_level(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-effllm")
    with caplog.at_level(logging.DEBUG, logger="effllm.kernels.cpu.build"):
        assert build.load_kernel("paged_decode.c", SIGNATURE) is None
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and "no C compiler" in record.message


def test_kernel_sources_ship_with_the_package():
    assert "void paged_decode(" in build.kernel_source("paged_decode.c")
    assert "static void attend(" in build.kernel_headers()["attention.h"]
    assert isinstance(build.cpu_features(), frozenset)


@pytest.mark.skipif(not build.shutil.which("cc"), reason="no C compiler")
def test_loading_a_kernel_keeps_the_process_floating_point_state(fresh_cache):
    """A library linked with -ffast-math would set flush-to-zero for the whole process on load."""
    import torch

    assert build.load_kernel("paged_decode.c", SIGNATURE) is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0  # a subnormal survives arithmetic
