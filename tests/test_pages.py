"""moe_mpi.cpu.pages: MLX weights moved into huge pages, unchanged, where Linux allows it."""

import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi import synthetic
from moe_mpi.cpu import pages
from moe_mpi.comm import Communicator


def _anon_huge_kib(spans) -> int:
    """AnonHugePages of the mappings that hold any of ``spans`` ((address, bytes) pairs).

    Only these mappings: the process-wide count also moves when unrelated
    huge pages elsewhere are split or freed meanwhile.
    """
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = any(addr < hi and lo < addr + size for addr, size in spans)
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def _collapse_supported() -> str:
    if not sys.platform.startswith("linux"):
        return "huge pages are collapsed on Linux only"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return "transparent huge pages are set to never"
    except OSError:
        return "no transparent huge pages in this kernel"
    release = tuple(int(p) for p in os.uname().release.split(".")[:2] if p.isdigit())
    if release < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1+, this is {os.uname().release}"
    return ""


def test_collapse_moves_mlx_weights_into_huge_pages_and_keeps_them():
    reason = _collapse_supported()
    if reason:
        pytest.skip(reason)
    arrays = [mx.random.normal((2688, 768), key=mx.random.key(i)) for i in range(4)]  # 8.3 MB each
    mx.eval(arrays)
    before = [np.array(a) for a in arrays]
    spans = [pages.array_span(a) for a in arrays]
    done = pages.collapse(arrays)
    # Each array's 2 MiB-aligned interior: at least 2 whole huge pages of its 8.3 MB.
    assert done >= 4 * 2 * pages.HUGE_PAGE, done
    # Every page collapse() reports is a huge page of the arrays' own mappings now.
    assert _anon_huge_kib(spans) >= done // 1024, "the kernel reports fewer huge pages than collapsed"
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(np.array(a), b)
    assert mx.allclose(arrays[0] @ mx.ones((768,)), mx.array(before[0]) @ mx.ones((768,))).item()


def test_collapse_skips_what_it_cannot_read_or_is_too_small():
    small = mx.ones((4, 4))
    bf16 = mx.ones((1024, 1024), dtype=mx.bfloat16)  # numpy has no bfloat16: skipped, no error
    mx.eval(small, bf16)
    assert pages.collapse([small, bf16]) == 0


def test_off_switch_and_model_entry_point(monkeypatch):
    layer = nn.Linear(1024, 1024)  # a 4 MiB weight and a 4 KiB bias
    mx.eval(layer.parameters())
    monkeypatch.setenv("MOE_MPI_HUGE_PAGES", "0")
    assert not pages.huge_pages_enabled() and pages.use_huge_pages(layer) == 0
    monkeypatch.setenv("MOE_MPI_HUGE_PAGES", "1")
    calls = []
    monkeypatch.setattr(pages, "collapse", lambda arrays: calls.append([a.shape for a in arrays]) or 0)
    pages.use_huge_pages(layer)
    if pages.huge_pages_enabled():
        assert calls == [[(1024, 1024)]]  # the weight; the 4 KiB bias is below a huge page


def test_loading_backs_the_weights_with_huge_pages(tmp_path, monkeypatch):
    """moe_mpi.load hands the evaluated model to use_huge_pages (through moe_mpi.cpu.accelerate)."""
    from moe_mpi import loading

    path = synthetic.write_checkpoint(tmp_path / "m", "qwen3_moe", seed=0)
    seen = []
    monkeypatch.setattr(pages, "use_huge_pages", lambda model: seen.append(model) or 0)
    model, _ = loading.load(path, comm=Communicator())
    assert seen == [model]
