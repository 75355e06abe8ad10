"""A fast BLAS for MLX's Linux CPU wheel.

The ``mlx[cpu]`` wheel for Linux links a reference BLAS that it bundles
(``mlx_cpu.libs/libblas-*.so``), far slower than an optimised one.
MLX resolves ``cblas_*`` dynamically, so a BLAS loaded with ``RTLD_GLOBAL``
*before* ``mlx.core`` is imported takes precedence. ``import moe_mpi`` does
this with Debian's OpenBLAS (package ``libopenblas0-pthread``, installed by
``make``); ``moe-mpi bench`` headers print the matmul speed each rank gets.

Because it happens at import, every model in the process gets the same BLAS:
moe_mpi's modes and plain mlx-lm alike (benchmarks compare like with like).

* ``MOE_MPI_BLAS=/path/to/libopenblas.so.0`` picks another library,
  ``MOE_MPI_BLAS=bundled`` keeps MLX's own.
* ``OPENBLAS_NUM_THREADS`` defaults to the cores per local rank (one thread
  per rank when there are as many ranks as cores).
* On macOS nothing happens: MLX uses Metal and Accelerate.
"""

import ctypes
import os
import re
import sys
from typing import Dict, List, Optional

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libopenblas.so.0",
)
# Set by Open MPI, MPICH/Hydra and Slurm for the ranks on this host.
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")

_loaded: Dict[str, Optional[str]] = {"path": None, "reason": "not tried"}


def _threads_per_rank() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = next((os.environ[v] for v in _LOCAL_SIZE_VARS if os.environ.get(v)), "1")
    try:
        ranks = max(1, int(local.split("(")[0]))
    except ValueError:
        ranks = 1
    return max(1, cores // ranks)


def preload_openblas() -> Optional[str]:
    """Loads OpenBLAS globally so that MLX uses it. Call before importing mlx.

    Returns:
        The library loaded, or None (not Linux, opted out, none found, or
        ``mlx.core`` already imported); :func:`blas_info` says why.
    """
    choice = os.environ.get("MOE_MPI_BLAS", "")
    if sys.platform != "linux":
        _loaded.update(path=None, reason="not Linux: MLX uses Accelerate/Metal")
    elif choice == "bundled":
        _loaded.update(path=None, reason="MOE_MPI_BLAS=bundled")
    elif "mlx.core" in sys.modules:
        _loaded.update(path=None, reason="mlx.core was imported before moe_mpi")
    else:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(_threads_per_rank()))
        arch = os.uname().machine
        paths = [choice] if choice else [c.format(arch=arch) for c in _CANDIDATES]
        for path in paths:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _loaded.update(path=path, reason="preloaded")
            return path
        _loaded.update(path=None, reason=f"no OpenBLAS found (tried {', '.join(paths)})")
    return None


_BLAS_NAME = re.compile(r"(openblas|libblas|libcblas|mkl_rt|libmkl|blis|accelerate)", re.I)


def mapped_libraries() -> Optional[List[str]]:
    """Shared objects mapped into this process that look like a BLAS; None off Linux."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:  # not Linux
        return None
    libs = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and _BLAS_NAME.search(os.path.basename(fields[-1])):
            libs.add(fields[-1])
    return sorted(libs)


def blas_info() -> dict:
    """Which BLAS this process uses, for benchmark reports and ``--verbose``."""
    return {
        "preloaded": _loaded["path"],
        "reason": _loaded["reason"],
        "mapped": mapped_libraries() or [],
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
