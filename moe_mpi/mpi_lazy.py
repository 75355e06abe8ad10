"""All-reduces left in MLX's lazy graph (``--backend mlx``), and waiting for them.

MPI is initialised single-threaded, and MLX runs an ``mx.distributed``
all-reduce on its own thread, inside whichever evaluation first needs it.
So before any MPI call from Python (mpi4py: control broadcasts, barriers,
the numpy step's all-reduce) the process waits for those in flight
(:func:`settle`). Evaluating the newest is enough: MLX runs one stream's
work in order.

From the first such all-reduce until :func:`settle`, the rank counts as
inside one operation for the watchdog (:data:`moe_mpi.mpi_activity.LAZY`).
"""

from __future__ import annotations

import mlx.core as mx

from .mpi_activity import ACTIVITY, LAZY

__all__ = ["hold", "pending", "settle"]


class _Newest:
    array = None  # the newest all-reduce left in the graph, of any communicator


_NEWEST = _Newest()


def hold(array: mx.array) -> mx.array:
    """Notes ``array``, an ``mx.distributed`` all-reduce not yet evaluated; returns it."""
    if _NEWEST.array is None:
        ACTIVITY.enter(LAZY)  # left in settle()
    _NEWEST.array = array
    return array


def pending() -> bool:
    """Whether an all-reduce left in the graph may still be running."""
    return _NEWEST.array is not None


def settle() -> None:
    """Waits for the all-reduces left in MLX's graph (nothing to do, an attribute read, if none)."""
    array = _NEWEST.array
    if array is None:
        return
    _NEWEST.array = None
    mx.eval(array)
    ACTIVITY.leave()
