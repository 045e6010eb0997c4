"""Huge pages behind CPU tensors: the ranges asked for, and that Linux backs them where it can."""

import pytest
import torch

from effllm.core import huge_pages
from effllm.core.huge_pages import HUGE_PAGE

MIB = 2**20


def test_ranges_round_out_to_huge_pages_merge_overlaps_and_skip_small_or_foreign_tensors():
    a = torch.empty(5 * MIB, dtype=torch.uint8)
    ranges = huge_pages._ranges([a, a[1:], torch.empty(1000), None, torch.empty(0)])
    assert len(ranges) == 1
    start, end = ranges[0]
    assert start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0
    assert start <= a.data_ptr() and a.data_ptr() + a.numel() <= end < a.data_ptr() + a.numel() + HUGE_PAGE
    assert huge_pages._ranges([torch.empty(8 * MIB, dtype=torch.uint8, device="meta")]) == []


def _backed(tensor: torch.Tensor) -> bool:
    return huge_pages.huge_bytes(tensor) >= HUGE_PAGE


@pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages on request here")
def test_collapse_backs_written_memory_with_huge_pages_and_keeps_its_values():
    t = torch.randn(4 * MIB)  # 16 MiB, written
    before = t.clone()
    if huge_pages.collapse([t]) == 0:
        pytest.skip("this kernel has no MADV_COLLAPSE or no huge page free")
    assert _backed(t)
    assert torch.equal(t, before)


@pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages on request here")
def test_advise_before_the_first_write_makes_its_page_faults_huge():
    t = torch.empty(4 * MIB)
    assert huge_pages.advise([t]) > 0
    t.fill_(1.0)
    assert _backed(t)
