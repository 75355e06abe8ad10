"""SHA-256 digests of named arrays: how two ranks, or two runs, tell that they hold the same weights.

Imports nothing from the package, so that any module can use it
(:mod:`moe_mpi.fingerprint` for the ranks' dense weights, :mod:`moe_mpi.shard`
for the routers that router statistics are recorded on).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Tuple

import mlx.core as mx

__all__ = ["array_digest"]


def array_digest(named: Iterable[Tuple[str, mx.array]]) -> str:
    """16 hex digits of SHA-256 over each array's name, dtype, shape and bytes, in the order given.

    A lazy array (a checkpoint tensor not read yet) is read for it.
    """
    h = hashlib.sha256()
    for path, a in named:
        h.update(f"{path}|{a.dtype}|{tuple(a.shape)}\0".encode())
        view = memoryview(a)  # the bytes as loaded
        if not view.c_contiguous:
            view = memoryview(mx.contiguous(a))
        h.update(view.cast("B"))
    return h.hexdigest()[:16]
