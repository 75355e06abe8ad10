"""Ranks that share a host's cores: the performance model's terms, and calibrate's measurement of them.

Where a host runs more ranks than it has cores (3 ranks on a 2-core VM),
two things happen at every collective that a model pricing each rank at
its measured rate misses:

* **Processor sharing.** A rank that reaches the collective early waits in
  it and gives up its core (Open MPI yields when oversubscribed), so the
  ranks still computing get more of the CPU. :func:`host_speeds` and
  :func:`shared_makespan` give the time the last rank finishes.
* **The rendezvous.** Even when every rank has the same work, the
  scheduler has one of them off a core at any moment, and the collective
  waits for whichever rank that was to get its core back and finish. On
  the 2-core VM of docs/perfmodel.md, 3 ranks, the wait grew with the
  compute between collectives, about 30% of it up to 15 ms and 20% at
  37 ms, and neither a measurement of rates (all ranks computing, no
  collective) nor one of the all-reduce (all ranks in a tight loop) sees
  it. :func:`measure_rendezvous` (run by ``moe-mpi calibrate`` on such a
  host) times it against the compute between collectives;
  :func:`rendezvous_wait` prices it.

A host with a core per rank, and every built-in Mac, has neither term.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["RENDEZVOUS_MB", "host_speeds", "measure_rendezvous", "rendezvous_wait", "shared_makespan"]

#: float32 matrices (MiB) whose matrix-vector product is the compute between
#: collectives in :func:`measure_rendezvous`; on the 2-core VM of
#: docs/perfmodel.md, with 3 ranks, about 0.2, 2, 5, 15 and 37 ms each (the
#: wait grew with the compute throughout: 0.1 to 7 ms).
RENDEZVOUS_MB = (8, 24, 64, 160, 400)
RENDEZVOUS_MESSAGE = 768  # float32 values: a decode step's one-token all-reduce of a 768-wide model
_LOOP_SECONDS = 0.25  # per timed loop; K is sized from a probe to take about this long


def host_speeds(ranks: Sequence) -> List[np.ndarray]:
    """Per host: the speed of each of its ranks while ``j`` of them compute, ``[k]`` for ``j = 1..k``.

    Rates are measured with ``ranks_per_host`` ranks computing at once.
    Where more ranks than cores share a host, a rank that waits in a
    collective gives up its core (Open MPI yields when oversubscribed), so
    those still computing share the cores among fewer (processor sharing):
    a rank's speed is ``min(1, cores / j) / min(1, cores / ranks_per_host)``
    of the measured rate. Hosts are consecutive ranks, ``ranks_per_host``
    each (mpirun fills a host's slots first). 1 throughout on a host with a
    core per rank, or whose cores are unknown (built-in machines).

    Args:
        ranks: One :class:`moe_mpi.profiles.Machine` per rank.
    """
    out = []
    r = 0
    while r < len(ranks):
        m = ranks[r]
        k = min(max(1, m.ranks_per_host), len(ranks) - r)
        j = np.arange(1, k + 1)
        if m.cores and m.ranks_per_host > m.cores:
            out.append(np.minimum(1.0, m.cores / j) / min(1.0, m.cores / m.ranks_per_host))
        else:
            out.append(np.ones(k))
        r += k
    return out


def _finish_times(seconds: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """``[S, k]``: when each of a host's ranks finishes, least loaded first, under processor sharing."""
    k = len(speed)
    work = np.sort(seconds, axis=1)  # [S, k], least first
    steps = np.diff(work, axis=1, prepend=0.0)  # work done while k, k-1, ... ranks compute
    return np.cumsum(steps / speed[::-1][:k], axis=1)


def shared_makespan(seconds: np.ndarray, speeds: Sequence[np.ndarray]) -> np.ndarray:
    """``[S]``: when the last rank finishes, from ``seconds[S, N]`` of work each at the measured rate.

    Within a host the ranks progress together at ``speeds[j - 1]`` while
    ``j`` of them still compute (:func:`host_speeds`); hosts run apart.
    """
    seconds = np.atleast_2d(np.asarray(seconds, dtype=np.float64))
    out = np.zeros(seconds.shape[0])
    start = 0
    for speed in speeds:
        k = len(speed)
        out = np.maximum(out, _finish_times(seconds[:, start:start + k], speed)[:, -1])
        start += k
    return out


def rendezvous_wait(seconds: np.ndarray, speeds: Sequence[np.ndarray], ranks: Sequence) -> np.ndarray:
    """``[S]``: the collective's extra wait, beyond :func:`shared_makespan`, on hosts with more ranks than cores.

    A host's wait is its machine's measured ``rendezvous`` curve at the
    host's makespan (the compute since the last collective), less the time
    its busiest ranks compute with a core each (the tail after fewer ranks
    than cores are left): with uneven work the rank the scheduler held back
    catches up in that tail. The collective ends when the last host's last
    rank arrives. Zero wherever no machine has a curve.

    Args:
        seconds: ``[S, N]`` work of each rank since the last collective, at
            its measured rate.
        speeds: :func:`host_speeds` of ``ranks``.
        ranks: One :class:`moe_mpi.profiles.Machine` per rank.
    """
    seconds = np.atleast_2d(np.asarray(seconds, dtype=np.float64))
    plain = np.zeros(seconds.shape[0])
    arrive = np.zeros(seconds.shape[0])
    start = 0
    for speed in speeds:
        k = len(speed)
        m = ranks[start]
        finish = _finish_times(seconds[:, start:start + k], speed)  # [S, k]
        makespan = finish[:, -1]
        wait = np.zeros_like(makespan)
        if m.rendezvous and m.cores and k > m.cores:
            tail = makespan - finish[:, k - m.cores - 1]  # time with a core per rank still computing
            wait = np.maximum(0.0, m.rendezvous_seconds(makespan) - tail)
        plain = np.maximum(plain, makespan)
        arrive = np.maximum(arrive, makespan + wait)
        start += k
    return arrive - plain


# ---------------------------------------------------------------------------
# The measurement (moe-mpi calibrate)
# ---------------------------------------------------------------------------


def measure_rendezvous(comm, sizes_mb: Sequence[int] = RENDEZVOUS_MB, say: Optional[Callable] = None
                       ) -> Tuple[Tuple[float, float], ...]:
    """Collective: the wait per collective of evenly loaded ranks sharing cores, against their compute.

    Every rank runs, in turn: ``K`` matrix-vector products alone (the
    compute's time per product with every rank computing, ``w``), the same
    with a small all-reduce after each (``step``), and the all-reduce alone
    in a loop (``a``). The wait is ``step - w - a``; the first two loops
    run twice and the faster counts; each time is the slowest rank's.

    Args:
        comm: A :class:`moe_mpi.comm.Communicator`.
        sizes_mb: Matrix sizes, smallest first: the compute between collectives.
        say: Prints a progress line on rank 0, if given.

    Returns:
        ``((w, wait), ...)`` in seconds, by ``w``: what
        :attr:`moe_mpi.profiles.Machine.rendezvous` holds.
    """
    table = []
    for mb in sizes_mb:
        table.append(_rendezvous_at(comm, mb))
        if say is not None:
            say(f"# rendezvous: {table[-1][0] * 1e3:.2f} ms of compute between collectives, "
                f"{table[-1][1] * 1e3:.2f} ms wait per collective", flush=True)
    return tuple(sorted(table))


def _rendezvous_at(comm, mb: int) -> Tuple[float, float]:
    """``(w, wait)`` of :func:`measure_rendezvous` for one ``mb`` MiB matrix (freed on return)."""
    mpi = comm.comm
    small = np.ones(RENDEZVOUS_MESSAGE, dtype=np.float32)
    out = np.empty_like(small)
    n = int((mb * 2**20 / 4) ** 0.5)
    matrix = np.full((n, n), 1.0 / n, dtype=np.float32)
    vector = np.ones(n, dtype=np.float32)

    def work():
        np.dot(matrix, vector)

    def step():
        np.dot(matrix, vector)
        mpi.Allreduce(small, out)

    def reduce():
        mpi.Allreduce(small, out)

    probe = _loop(comm, work, 5)
    count = int(np.clip(_LOOP_SECONDS / max(probe, 1e-6), 10, 400))
    w = min(_loop(comm, work, count) for _ in range(2))
    s = min(_loop(comm, step, count) for _ in range(2))
    a = _loop(comm, reduce, count)
    return w, max(0.0, s - w - a)


def _loop(comm, fn: Callable[[], object], count: int) -> float:
    """Seconds per call of ``fn``, every rank looping from one barrier; the slowest rank's."""
    comm.barrier()
    start = time.perf_counter()
    for _ in range(count):
        fn()
    seconds = (time.perf_counter() - start) / count
    return max(comm.allgather(seconds))
