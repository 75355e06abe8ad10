"""A barrier in which ranks that sit out sleep (benchmarks: one rank works, the others wait)."""

from __future__ import annotations

import time

from .comm import Communicator
from .mpi_activity import ACTIVITY
from .mpi_turn import settle

__all__ = ["QUIET_POLL_SECONDS", "quiet_barrier"]

#: How often a rank that sits out a quiet barrier polls it.
QUIET_POLL_SECONDS = 0.002


def quiet_barrier(comm, idle: bool = True) -> None:
    """A barrier in which ranks that sit out sleep instead of spinning in MPI.

    On a shared host a rank spinning in ``MPI_Barrier`` takes a core from
    the rank doing the work. Every rank must call this (a blocking barrier
    does not match the ``Ibarrier``); ``idle=False`` ranks wait without
    sleeping, so they leave it as soon as possible.

    Args:
        comm: A :class:`Communicator` or an mpi4py communicator.
        idle: Whether this rank sleeps between polls.
    """
    mpi_comm = comm.comm if isinstance(comm, Communicator) else comm
    if mpi_comm.Get_size() == 1:
        return
    settle()
    ACTIVITY.enter("barrier")
    request = mpi_comm.Ibarrier()
    if idle:
        while not request.Test():
            time.sleep(QUIET_POLL_SECONDS)
    else:
        request.Wait()
    ACTIVITY.leave()
