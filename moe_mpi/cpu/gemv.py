"""Matrix-vector products for CPU decode: a compiled loop, or numpy's BLAS.

Decode reads every weight once per token for one row (or a few), so its
speed is how fast one core streams the weights from memory.
``moe_mpi/cpu/_gemv.c`` does it in one sequential pass over ``[out, in]``
memory with software prefetch, which streams faster than OpenBLAS's
``sgemv`` or MLX's ``sgemm`` on the machines we measured
(docs/benchmarks.md). It is built with the package (a C compiler is needed;
without one the package installs without it).

Without the compiled loop, or with ``MOE_MPI_GEMV_KERNEL=0``, the products
go to numpy's BLAS, and the expert weights are stored ``[in, out]`` for it
(:func:`moe_mpi.cpu.experts.transposed_paths`).
"""

from typing import Optional

import numpy as np

from . import switches

try:
    from . import _gemv
except ImportError:  # built without a C compiler
    _gemv = None

# Read once: the expert weights' layout is chosen at load time to suit it.
_KERNEL = _gemv if switches.get("MOE_MPI_GEMV_KERNEL") == "1" else None


def compiled() -> Optional[str]:
    """The compiled loop in use (``"avx512f"``, ``"avx2"`` or ``"plain"``),
    or None when the products go to numpy's BLAS."""
    return None if _KERNEL is None else _KERNEL.isa()


def describe() -> str:
    """One line for reports: which matrix-vector kernel decode uses."""
    isa = compiled()
    if isa is not None:
        return f"moe_mpi.cpu._gemv ({isa})"
    why = "MOE_MPI_GEMV_KERNEL=0" if _gemv is not None else "not built"
    return f"numpy BLAS sgemv (compiled loop {why})"


def matvec(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x @ w.T``: a few rows through one weight matrix, reading it once.

    Args:
        w: float32 ``[n, k]``: a weight in MLX's ``[out, in]`` layout. A
            C-contiguous one goes to the compiled loop; any other view (the
            ``[in, out]`` layout) to numpy's BLAS ``sgemv``.
        x: float32 ``[k]`` or ``[m, k]``, a few rows (decode).

    Returns:
        float32 ``[n]`` or ``[m, n]``.
    """
    if _KERNEL is None or not w.flags.c_contiguous or w.dtype != np.float32:
        if x.ndim == 1:
            return w @ x  # [n]
        return np.stack([w @ row for row in x])  # [m, n]: one sgemv per row
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"matvec: x has {x.shape[-1]} features, w [{n}, {k}] takes k={k}")
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, k)  # [m, k]
    y = np.empty((rows.shape[0], n), dtype=np.float32)  # [m, n]
    _KERNEL.gemv(w, rows, y, n, k, rows.shape[0])
    return y.reshape(*x.shape[:-1], n)


def read(a: np.ndarray) -> float:
    """Reads ``a`` once, front to back, and does nothing else: a memory probe.

    For the read-only bandwidth of :func:`moe_mpi.bench.roofline.stream_read`
    (decode only reads its weights). The compiled loop is one sequential
    stream with software prefetch; without it, numpy's sum.

    Args:
        a: a C-contiguous float32 array.

    Returns:
        The float32 sum of ``a`` (returned so that the read cannot be skipped).
    """
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError(f"read: a C-contiguous float32 array, not {a.dtype} {a.shape}")
    if _gemv is None:
        return float(a.sum(dtype=np.float32))
    return _gemv.read(a)
