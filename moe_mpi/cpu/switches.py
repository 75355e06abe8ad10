"""The environment switches of the CPU speed path, in one table.

Each is read where it takes effect; all are listed here with their
defaults, so that ``moe-mpi bench`` can record every switch in force and
the docs have one place to point at.
"""

import os
from typing import Dict

import mlx.core as mx

#: Switch -> (default, what it does).
SWITCHES: Dict[str, tuple] = {
    "MOE_MPI_CPU": ("1", "0 turns the whole CPU speed path off: MLX's own kernels only"),
    "MOE_MPI_BLAS": ("", "a libopenblas.so to preload for MLX, or 'bundled' for the wheel's reference BLAS"),
    "MOE_MPI_NUMPY_KERNELS": ("1", "0: no decode-sized work in numpy (one-row products, norms, RoPE, few-row experts)"),
    "MOE_MPI_NUMPY_DECODE": ("1", "0: no whole decode steps in numpy (qwen3_moe, mixtral)"),
    "MOE_MPI_GEMV_KERNEL": ("1", "0: matrix-vector products on numpy's BLAS instead of the compiled loop"),
    "MOE_MPI_HUGE_PAGES": ("1", "0: leave the weights on 4 KiB pages"),
    "MOE_MPI_EXPERT_KERNEL": ("", "'dense' (one BLAS matmul per expert) or 'gather' (the switch layer's gather_mm)"),
    "MOE_MPI_DENSE_MIN_ROWS": ("2", "experts with fewer rows go through one gather_mm call together"),
    "MOE_MPI_NUMPY_MAX_ROWS": ("4", "float experts with at most this many rows run in numpy"),
}


def get(name: str) -> str:
    """The value of switch ``name`` (its default when unset)."""
    return os.environ.get(name, SWITCHES[name][0])


def in_force() -> Dict[str, str]:
    """Every ``MOE_MPI_*`` variable set in this process's environment."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOE_MPI_")}


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (Linux, or a Mac told to), not on Metal."""
    return mx.default_device() == mx.cpu


def enabled() -> bool:
    """Whether the CPU speed path applies: MLX on the CPU and ``MOE_MPI_CPU`` not 0."""
    return get("MOE_MPI_CPU") == "1" and on_cpu()


def numpy_kernels() -> bool:
    """Whether decode-sized float32 work may run in numpy (``MOE_MPI_NUMPY_KERNELS``)."""
    return enabled() and get("MOE_MPI_NUMPY_KERNELS") == "1"
