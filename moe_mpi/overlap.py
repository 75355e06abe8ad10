"""Two-batch overlap: each micro-batch's all-reduces travel while the other computes.

A layer's all-reduce cannot overlap with that layer's own work: the next
layer needs its sum. It can overlap with another, independent batch's work.
So the running sequences are kept in two cohorts, each an mlx-lm
``BatchGenerator`` with its own caches (:class:`Cohorts`), and a step runs
both cohorts' forward passes in turns on one thread (:class:`Interleave`)::

    cohort A: layer 0 ... start all-reduce A0 |                 | wait A0, layer 1 ... start A1 |
    cohort B:                                  | layer 0 ... start B0 |                 | wait B0, layer 1 ...

While A's message is on the wire, B computes, and the other way round.
Over a slow or distant link (Ethernet between Macs) that hides the
all-reduce behind compute; on one host, where an all-reduce takes
microseconds, it hides nothing. What it costs: each cohort's step reads the
weights of the experts it routes to, so an expert chosen by both cohorts is
read twice per step, where one batch reads it once. Where a step is bound by
reading weights (batched decode on a Mac) that can cost more than it hides;
prefill and CPU-bound steps lose little (docs/serving.md, "Overlap").

The turns are taken at the all-reduces (:attr:`moe_mpi.comm.Communicator.overlap`):
a task hands its all-reduce to a thread of its own (:class:`_Wire`), which
keeps MPI moving the message, and hands over; the other task runs to its
own next all-reduce and hands back, and the first waits for its sum. The
tasks are greenlets (the ``greenlet`` package) on the main thread, so MLX
sees the single-threaded program it sees without overlap; MPI is entered by
one thread at a time (the main thread's other MPI calls wait until the
wire is idle), and the all-reduces start in the same order on every rank
(A0, B0, A1, B1, ...), so they match across ranks as they do without overlap.
Each greenlet has its own context variables, so state a task sets for its
own forward pass (:mod:`moe_mpi.unread`) does not leak into the other's.

Each all-reduce is still one collective per MoE layer and call, as without
overlap: two cohorts make two forward passes of half the rows each.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import mlx.core as mx
from greenlet import getcurrent, greenlet

from .mpi_turn import attach, detach, settle
from .unread import skip_unread_prefill

__all__ = ["Cohorts", "Interleave", "check_overlap"]


def check_overlap(comm) -> None:
    """Raises ``ValueError`` if ``comm`` cannot overlap its all-reduces.

    Overlap needs the ``mpi4py`` data path (non-blocking ``Iallreduce``):
    MLX's own all-reduce runs to its end when evaluated.
    """
    if comm.backend != "mpi4py":
        raise ValueError(f"overlap needs the all-reduce backend 'mpi4py', not {comm.backend!r}")


#: Seconds between the first checks of an all-reduce on the wire; the wait
#: doubles after each check up to :data:`MAX_POLL_SECONDS`. Each check costs
#: the rank's compute a few microseconds of its core: short waits catch a
#: quick reduction, long ones keep a slow link's many checks cheap.
POLL_SECONDS = 50e-6
MAX_POLL_SECONDS = 1e-3


class _Job:
    """One all-reduce handed to the wire thread."""

    def __init__(self, comm, buf):
        self.comm, self.buf = comm, buf
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def result(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Wire(threading.Thread):
    """The thread that moves all-reduces while the main thread computes.

    MPI moves a message only while some thread is inside an MPI call (TCP
    sockets are read and written, and a large message's hand-shake answered,
    in MPI's progress loop); on the main thread that would be only at the
    next all-reduce. So the reductions run here, one at a time in the order
    they were handed in (the same order on every rank): a non-blocking
    ``Iallreduce``, checked after :data:`POLL_SECONDS` and then less and less
    often, sleeping in between so as not to take a core from the compute. Only one thread is in MPI at a
    time: the main thread makes its other MPI calls after
    :func:`moe_mpi.mpi_turn.settle`, which waits until :attr:`idle` is set.
    """

    def __init__(self):
        super().__init__(name="moe_mpi-overlap-wire", daemon=True)
        self.jobs: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.pending = 0  # jobs handed in and not done; under _lock (two threads change it)
        self._lock = threading.Lock()
        attach(self.idle)
        self.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            self.pending += 1
            self.idle.clear()
        self.jobs.put(job)

    def run(self) -> None:
        from mpi4py import MPI

        while (job := self.jobs.get()) is not None:
            try:
                request = job.comm.Iallreduce(MPI.IN_PLACE, job.buf, op=MPI.SUM)
                wait = POLL_SECONDS
                while not request.Test():
                    time.sleep(wait)
                    wait = min(2 * wait, MAX_POLL_SECONDS)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting task
                job.error = e
            with self._lock:
                self.pending -= 1
                if self.pending == 0:
                    self.idle.set()
            job.done.set()

    def stop(self) -> None:
        self.jobs.put(None)
        detach(self.idle)


class Interleave:
    """Runs callables in turns on this thread, switching at every all-reduce of ``comm``.

    Args:
        comm: The :class:`moe_mpi.Communicator` whose all-reduces the tasks make.
    """

    def __init__(self, comm):
        check_overlap(comm)
        self.comm = comm
        self._tasks: set = set()
        self._wire: Optional[_Wire] = None

    def run(self, tasks: Sequence[Callable[[], Any]]) -> List[Any]:
        """Runs ``tasks`` to their ends, in turns; returns their results in order.

        With one task, or one rank (nothing travels), they simply run one
        after the other. An exception in a task ends the run and propagates
        (a collective is then left half done on every rank: the job's error
        path ends it).
        """
        if len(tasks) < 2 or self.comm.size == 1:
            return [task() for task in tasks]
        if self.comm.overlap is not None:
            raise RuntimeError("Interleave.run is not reentrant: the communicator is already interleaving")
        if self._wire is None:
            self._wire = _Wire()
        runs = [greenlet(task) for task in tasks]
        results: List[Any] = [None] * len(runs)
        self._tasks = set(runs)
        self.comm.overlap = self
        try:
            while any(not g.dead for g in runs):
                for i, g in enumerate(runs):
                    if not g.dead:
                        value = g.switch()  # runs g to its next all-reduce, or to its end
                        if g.dead:
                            results[i] = value
        finally:
            # After an error, an all-reduce may be left waiting for peers
            # that will never send: no drain then (the error path ends the job).
            self.comm.overlap = None
            self._tasks = set()
        settle()  # every task waited for its own all-reduces: this returns at once
        return results

    def reduce(self, mpi_comm, buf) -> float:
        """Sums ``buf`` in place over ``mpi_comm``; the other tasks run meanwhile.

        Called by :meth:`moe_mpi.Communicator.all_sum` while this run is on.
        Returns the seconds spent in the other tasks.
        """
        job = _Job(mpi_comm, buf)
        self._wire.submit(job)
        task = getcurrent()
        other = 0.0
        if task in self._tasks:  # not the scheduler itself
            start = time.perf_counter()
            task.parent.switch()
            other = time.perf_counter() - start
        job.result()
        return other

    def close(self) -> None:
        """Ends the wire thread (a new :meth:`run` starts another)."""
        if self._wire is not None:
            self._wire.stop()
            self._wire.join()
            self._wire = None


class Cohorts:
    """Two (or more) mlx-lm ``BatchGenerator``s stepped together, their all-reduces overlapped.

    Stands in for one ``BatchGenerator`` where :class:`moe_mpi.serve.engine.Engine`
    uses it: ``insert_segments``, ``next``, ``remove``, ``extract_cache``.
    A new sequence joins the cohort with the fewest sequences (the same
    choice on every rank: the same joins in the same order). A sequence's
    id is ``cohort_uid * n + cohort``.

    Args:
        model: The sharded model.
        comm: Its communicator (backend ``mpi4py``).
        n: Cohorts (2: two-batch overlap).
        completion_batch_size, prefill_batch_size: Of all cohorts together,
            as for one ``BatchGenerator``; each cohort gets its share
            (rounded up).
        **kwargs: Passed to every ``BatchGenerator``.
    """

    def __init__(self, model, comm, n: int = 2, *, completion_batch_size: int = 32, prefill_batch_size: int = 8,
                 **kwargs):
        from mlx_lm.generate import BatchGenerator

        if n < 2:
            raise ValueError(f"cohorts={n}: overlap needs at least 2")
        self.n = n
        self.interleave = Interleave(comm)
        self.members = [
            BatchGenerator(
                model,
                completion_batch_size=-(-completion_batch_size // n),
                prefill_batch_size=-(-prefill_batch_size // n),
                **kwargs,
            )
            for _ in range(n)
        ]
        self._live: List[set] = [set() for _ in range(n)]  # cohort uids of each cohort's sequences

    def skip_unread_prefill(self, tail) -> bool:
        """:func:`moe_mpi.unread.skip_unread_prefill` for every cohort; whether all took it."""
        return all([skip_unread_prefill(m, tail) for m in self.members])

    def _split(self, uids) -> List[List[int]]:
        mine: List[List[int]] = [[] for _ in range(self.n)]
        for uid in uids:
            mine[uid % self.n].append(uid // self.n)
        return mine

    def insert_segments(self, segments, **options) -> List[int]:
        """As ``BatchGenerator.insert_segments``; each sequence goes to the smallest cohort."""
        uids = []
        for i in range(len(segments)):
            c = min(range(self.n), key=lambda j: (len(self._live[j]), j))
            one = {k: [v[i]] for k, v in options.items() if v is not None}
            (uid,) = self.members[c].insert_segments([segments[i]], **one)
            self._live[c].add(uid)
            uids.append(uid * self.n + c)
        return uids

    def insert(self, prompts, max_tokens=None, **options) -> List[int]:
        """As ``BatchGenerator.insert``: one segment per prompt."""
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        return self.insert_segments([[p] for p in prompts], **options)

    def next(self):
        """One step of every cohort, their forward passes in turns: ``(prompt_responses, responses)``."""
        busy = [c for c in range(self.n) if self._live[c]]
        # Every cohort runs on mlx-lm's generation stream; entered once
        # around the turns, so that a cohort's own ``with mx.stream`` leaving
        # mid-turn restores that same stream for the other.
        with mx.stream(self.members[0].stream):
            steps = self.interleave.run([self.members[c].next for c in busy])
        prompt_responses, responses = [], []
        for c, (prompts, generated) in zip(busy, steps):
            for r in prompts:
                r.uid = r.uid * self.n + c
            for r in generated:
                if r.finish_reason is not None:
                    self._live[c].discard(r.uid)
                r.uid = r.uid * self.n + c
            prompt_responses += prompts
            responses += generated
        return prompt_responses, responses

    def next_generated(self):
        """As ``BatchGenerator.next_generated``: steps until tokens come out (or nothing is left)."""
        while True:
            prompts, generated = self.next()
            if not generated and prompts:
                continue
            return generated

    def remove(self, uids, return_prompt_caches: bool = False) -> Dict[int, Any]:
        caches = {}
        for c, mine in enumerate(self._split(uids)):
            if mine:
                got = self.members[c].remove(mine, return_prompt_caches=return_prompt_caches)
                caches.update({uid * self.n + c: v for uid, v in got.items()})
                self._live[c].difference_update(mine)
        return caches

    def extract_cache(self, uids) -> Dict[int, Any]:
        out = {}
        for c, mine in enumerate(self._split(uids)):
            if mine:
                out.update({uid * self.n + c: v for uid, v in self.members[c].extract_cache(mine).items()})
        return out

    @property
    def sizes(self) -> List[int]:
        """Sequences in each cohort."""
        return [len(live) for live in self._live]

    def close(self) -> None:
        for m in self.members:
            m.close()
        self.interleave.close()
        mx.clear_cache()
