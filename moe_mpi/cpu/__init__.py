"""The CPU speed path: what makes MLX's Linux CPU backend fast. Optional.

Everything here exists because MLX on a Linux CPU is slow where Metal is
not: the wheel's reference BLAS (:mod:`.blas`), matmuls that pack a matrix
to multiply one row (:mod:`.gemv`, :mod:`.layers`), ``gather_mm`` without
BLAS (:mod:`.experts`), hundreds of small ops per decode step
(:mod:`.decode`), weights on 4 KiB pages (:mod:`.pages`). On a Mac (Metal)
none of it applies.

The core reaches it through one door, :func:`accelerate`, called once a
model's weights are loaded (``moe_mpi.load``, ``moe_mpi.shard_experts``);
``import moe_mpi`` also preloads the BLAS (:func:`preload_blas`), which
must happen before MLX is imported. Nothing else in the core imports this
package. The switches are in :mod:`.switches`.
"""

from dataclasses import dataclass
from typing import Optional

from .blas import preload_openblas as preload_blas

__all__ = ["CpuPath", "accelerate", "preload_blas"]


@dataclass
class CpuPath:
    """What :func:`accelerate` did to a model (``model.cpu_path``).

    Attributes:
        enabled: Whether the CPU speed path applies (MLX on the CPU, and not
            turned off with ``MOE_MPI_CPU=0``).
        numpy_layers: Dense layers (linear, RMS norm, RoPE) with numpy decode kernels.
        expert_layers: Switch layers with the CPU expert kernels.
        huge_page_bytes: Weight bytes moved into huge pages.
        decode_step: The numpy decode step (:mod:`.decode`), or None.
        decode_step_off: Why there is no numpy decode step, or None.
    """

    enabled: bool = False
    numpy_layers: int = 0
    expert_layers: int = 0
    huge_page_bytes: int = 0
    decode_step: Optional[object] = None
    decode_step_off: Optional[str] = None

    @property
    def numpy_steps(self) -> int:
        """Decode steps the numpy step has run so far (0 without one)."""
        return self.decode_step.steps if self.decode_step is not None else 0


def accelerate(model) -> CpuPath:
    """Gives a loaded moe_mpi shard the CPU speed path. Does nothing on Metal.

    In order: the CPU expert kernels on every local switch layer, numpy
    kernels for the dense part's decode-sized work, huge pages for the
    weights, and the numpy decode step where the architecture is covered.

    Returns:
        The record, also kept as ``model.cpu_path``.
    """
    from . import switches

    path = CpuPath(enabled=switches.enabled())
    model.cpu_path = path
    if not path.enabled:
        path.decode_step_off = "the CPU speed path is off (MLX on a GPU, or MOE_MPI_CPU=0)"
        return path
    from .decode import use_numpy_decode
    from .experts import use_cpu_experts
    from .layers import use_numpy_layers
    from .pages import use_huge_pages

    central = getattr(getattr(model, "ep_info", None), "mode", None) == "central"
    path.expert_layers = use_cpu_experts(model, full=not central)
    if switches.numpy_kernels():
        path.numpy_layers = use_numpy_layers(model)
    path.huge_page_bytes = use_huge_pages(model)
    path.decode_step_off = use_numpy_decode(model)
    return path

