"""Huge pages for the weights that CPU decode streams (Linux).

Decode reads every weight once per token, one sequential pass per matrix
(:mod:`moe_mpi.gemv`). MLX allocates its arrays with ``malloc``, so where the
kernel's transparent huge pages are in ``madvise`` mode (the default on
many distributions) its weights sit on 4 KiB pages, while numpy asks for
huge pages for its own large arrays. A sequential read then crosses a page
boundary every 4 KiB, each a TLB miss, and the CPU's hardware prefetchers do
not cross page boundaries. ``MADV_COLLAPSE`` (Linux 6.1+) moves the pages of
an existing range into 2 MiB pages in place, synchronously, keeping their
contents (what it is worth: ``examples/hugepages_ab.py``, docs/benchmarks.md).

Elsewhere (macOS, older kernels, GPU arrays) this does nothing.
``MOE_MPI_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import switches

__all__ = ["collapse", "huge_pages_enabled", "large_weights", "use_huge_pages"]

MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+
HUGE_PAGE = 1 << 21  # 2 MiB: x86-64 and arm64 with 4 KiB base pages


def huge_pages_enabled() -> bool:
    """Linux, the CPU speed path on, and not turned off with ``MOE_MPI_HUGE_PAGES=0``."""
    return sys.platform.startswith("linux") and switches.enabled() and switches.get("MOE_MPI_HUGE_PAGES") == "1"


@functools.lru_cache(maxsize=None)
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def array_span(a: mx.array) -> Optional[tuple]:
    """(address, bytes) of an evaluated array's memory, or None if numpy cannot view it."""
    try:
        view = np.asarray(memoryview(a))  # no copy; fails for dtypes numpy lacks (bfloat16)
    except (TypeError, ValueError, BufferError, RuntimeError):
        return None
    return view.__array_interface__["data"][0], a.nbytes


def collapse(arrays: Iterable[mx.array]) -> int:
    """Moves the whole 2 MiB pages inside each array's memory into huge pages.

    Only the 2 MiB-aligned interior of each array is touched, so no memory
    outside the arrays is affected and nothing is allocated beyond them.

    Returns:
        The bytes now in huge pages (0 where the kernel refused, e.g. before
        Linux 6.1 or with transparent huge pages set to ``never``).
    """
    madvise = _madvise()
    done = 0
    for a in arrays:
        span = array_span(a)
        if span is None:
            continue
        addr, size = span
        start = -(-addr // HUGE_PAGE) * HUGE_PAGE
        end = (addr + size) // HUGE_PAGE * HUGE_PAGE
        if end > start and madvise(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
    return done


def use_huge_pages(model: nn.Module) -> int:
    """Backs a loaded model's large weights with huge pages (see the module docstring).

    Call it after the weights are evaluated. Does nothing unless
    :func:`huge_pages_enabled`.

    Returns:
        The bytes moved into huge pages.
    """
    if not huge_pages_enabled():
        return 0
    return collapse(large_weights(model))


def large_weights(model: nn.Module) -> list:
    """The parameters of ``model`` that can hold a whole huge page (>= 2 MiB)."""
    return [a for _, a in tree_flatten(model.parameters()) if a.nbytes >= HUGE_PAGE]
