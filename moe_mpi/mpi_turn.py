"""MPI from one thread at a time: waiting for the MPI work of other threads.

MPI is initialised single-threaded (``THREAD_SINGLE``: what MLX asks for
when it initialises first), yet two kinds of work reach MPI from threads
other than the one running Python:

* **All-reduces left in MLX's lazy graph** (``--backend mlx``): MLX runs an
  ``mx.distributed`` all-reduce on its own thread, inside whichever
  evaluation first needs it (:func:`hold`). Evaluating the newest is enough
  to wait for all of them: MLX runs one stream's work in order.
* **Overlap's wire thread** (:mod:`moe_mpi.overlap`), which keeps
  non-blocking all-reduces moving while this thread computes
  (:func:`attach`).

So every MPI call from Python (mpi4py: control broadcasts, barriers, the
numpy step's all-reduce) first calls :func:`settle`, one step for both.

MLX's own collectives need the same care among themselves: MLX runs each
stream's work on a thread of its own, and a collective runs on the stream
it was made on. mlx-lm generates on a stream of its own, and starts the
next step before the caller's next forward pass (``mx.async_eval``), so
collectives made on two streams could run on two threads at once, in an
order that depends on timing: ranks then pair different all-reduces
(``MPI_ERR_TRUNCATE``), or MPI's state breaks. So every collective
moe_mpi leaves in MLX's graph is made on one stream,
:func:`collective_stream`: MLX runs them one at a time, in the order they
were handed to it, which is the program's order on every rank.

From the first lazy all-reduce until :func:`settle`, the rank counts as
inside one operation for the watchdog (:data:`moe_mpi.mpi_activity.LAZY`).
"""

from __future__ import annotations

import functools
import threading
from typing import List

import mlx.core as mx

from .mpi_activity import ACTIVITY, LAZY

__all__ = ["attach", "collective_stream", "detach", "hold", "pending", "settle"]


class _Others:
    array = None  # the newest all-reduce left in the graph, of any communicator
    idle: List[threading.Event] = []  # one per thread that makes MPI calls of its own: set while it makes none


_OTHERS = _Others()


@functools.lru_cache(maxsize=None)
def collective_stream() -> mx.Stream:
    """The one stream of every ``mx.distributed`` collective moe_mpi makes (see above)."""
    return mx.new_stream(mx.cpu)


def hold(array: mx.array) -> mx.array:
    """Notes ``array``, an ``mx.distributed`` all-reduce not yet evaluated; returns it."""
    if _OTHERS.array is None:
        ACTIVITY.enter(LAZY)  # left in settle()
    _OTHERS.array = array
    return array


def attach(idle: threading.Event) -> None:
    """Notes a thread that calls MPI; ``idle`` is set whenever it has no call in progress."""
    _OTHERS.idle = _OTHERS.idle + [idle]


def detach(idle: threading.Event) -> None:
    """Forgets the thread :func:`attach` noted with ``idle``."""
    _OTHERS.idle = [e for e in _OTHERS.idle if e is not idle]


def pending() -> bool:
    """Whether MPI work of another thread may still be running."""
    if _OTHERS.array is not None:
        return True
    for idle in _OTHERS.idle:
        if not idle.is_set():
            return True
    return False


def settle() -> None:
    """Waits until no other thread is in MPI (an attribute read or two when none is)."""
    array = _OTHERS.array
    if array is not None:
        _OTHERS.array = None
        mx.eval(array)
        ACTIVITY.leave()
    for idle in _OTHERS.idle:
        idle.wait()
