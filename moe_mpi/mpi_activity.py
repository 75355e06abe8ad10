"""Counters of this process's MPI operations, read by the watchdog.

:class:`moe_mpi.comm.Communicator` and the control channel of ``moe-mpi
serve`` count their operations here; :mod:`moe_mpi.watchdog` reads the
counters from its own thread.
"""

from __future__ import annotations

__all__ = ["ACTIVITY", "LAZY", "Activity"]


class Activity:
    """Where this process is in its collectives, for a watchdog thread to read.

    Every MPI operation of a :class:`moe_mpi.comm.Communicator` (and
    :func:`moe_mpi.barrier.quiet_barrier`) adds one to ``entered`` when it
    starts waiting on other ranks and one to ``left`` when it returns, so
    ``entered > left`` means "inside operation number ``entered``". The
    ranks run their collectives in the same order, so the numbers are
    comparable across ranks. Two integer increments per call: the cost on
    the hot path is tens of nanoseconds against an all-reduce's tens of
    microseconds. ``kind`` names the operation, except on the all-reduce's
    hot path, which leaves it ``"all_sum"``.
    """

    __slots__ = ("entered", "left", "kind")

    def __init__(self):
        self.entered = 0
        self.left = 0
        self.kind = "all_sum"

    def enter(self, kind: str) -> None:
        self.kind = kind
        self.entered += 1

    def leave(self) -> None:
        self.left += 1
        self.kind = "all_sum"


#: ``Activity.kind`` while all-reduces that ``--backend mlx`` left in MLX's
#: lazy graph may be running (:func:`moe_mpi.mpi_turn.settle` ends it). The
#: forward pass computes meanwhile, for as long as it takes, so the watchdog
#: ends the job then only for a rank that stopped answering.
LAZY = "forward pass (all-reduces in MLX's graph)"

#: The process's one :class:`Activity`, shared by all its communicators
#: (``generate --backend mlx`` makes a second one).
ACTIVITY = Activity()
