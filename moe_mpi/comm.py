"""MPI communication for expert-parallel MoE inference.

Every rank runs the same program. The only collective on the hot path is one
sum all-reduce of the MoE block output per layer (:meth:`Communicator.all_sum`);
the rest (:meth:`~Communicator.bcast`, :meth:`~Communicator.barrier`, ...) is
control traffic for prompts, sampled tokens and statistics.

Two data paths implement :meth:`Communicator.all_sum`:

* ``"mpi4py"`` (default): evaluate the array, hand MPI a zero-copy view of
  its buffer, ``Allreduce`` into a reused numpy buffer and wrap the result in a
  new ``mx.array``. Fastest for decode-sized messages (a few KiB), where the
  cost is dominated by per-call overhead (see ``examples/allreduce_paths.py``).
* ``"mlx"``: ``mx.distributed.all_sum`` on the group of MLX's own MPI
  backend, left in MLX's lazy graph as mlx-lm's tensor parallelism leaves
  it: a forward pass is one graph, evaluated once, with no wait on the host
  per layer (where the layout also needs no routing read back, see
  :mod:`moe_mpi.experts`). Reduces bfloat16 natively. MPI is initialised
  single-threaded and MLX runs the reduction on its own thread, so every
  other MPI call of the process first waits for the all-reduces in flight
  (:func:`moe_mpi.mpi_turn.settle`). Its counters count calls and bytes; their seconds are
  not measured (the reduction runs inside some later evaluation).

Every rank must create its :class:`Communicator` (and thus call
:func:`~moe_mpi.mpi_init.init_mpi`, the one place MPI is initialised) before
using mpi4py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import mlx.core as mx
import msgpack
import numpy as np

from .mpi_activity import ACTIVITY
from .mpi_dtypes import buffer_format, summable_dtypes
from .mpi_init import init_mpi, mlx_group
from .mpi_turn import collective_stream, hold, pending, settle

__all__ = [
    "BACKENDS",
    "CollectiveStats",
    "Communicator",
    "init_mpi",
    "mlx_group",
    "settle",
]

#: Valid values of ``Communicator(backend=...)``.
BACKENDS = ("mpi4py", "mlx")

#: Collective kinds that have counters in :attr:`Communicator.stats`.
KINDS = ("all_sum", "all_gather", "bcast", "barrier", "allreduce_max", "allgather", "send", "recv")

@dataclasses.dataclass
class CollectiveStats:
    """Counters for one kind of collective on one rank.

    Attributes:
        calls: Number of calls.
        bytes: Payload bytes this rank contributed (0 on a single rank, where
            nothing leaves the process). For ``all_sum`` this is
            ``x.nbytes`` in the caller's dtype, independent of the backend,
            even though the mpi4py path moves bfloat16 as float32.
        seconds: Wall time spent inside the call (buffer conversions plus MPI,
            including waiting for slower ranks; not the evaluation of the
            input's lazy graph).
        timed: False where ``seconds`` is not measured: the ``"mlx"``
            backend's all-reduces run inside a later evaluation.
    """

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    timed: bool = True

    def add(self, nbytes: int, seconds: float) -> None:
        """Record one call."""
        self.calls += 1
        self.bytes += nbytes
        self.seconds += seconds


class Communicator:
    """A thin, instrumented wrapper over an mpi4py communicator.

    All methods are collective over ``comm`` and must be called in the same
    order on every rank. Not thread-safe.

    Args:
        comm: An mpi4py intracommunicator. Default: ``MPI.COMM_WORLD``.
        backend: Data path of :meth:`all_sum`, ``"mpi4py"`` or ``"mlx"``.
            Default: ``"mpi4py"``, the faster one for decode-sized messages.
        group: The ``mx.distributed.Group`` used by the ``"mlx"`` backend.
            Default: MLX's global MPI group. It must have the same rank and
            size as ``comm``.

    Raises:
        ValueError: Unknown ``backend``, or ``group``/``comm`` disagree.
        RuntimeError: ``backend="mlx"`` but MLX does not share the MPI world
            (MPI was initialised by mpi4py before MLX, or MLX could not load
            libmpi).
    """

    def __init__(self, comm=None, backend: str = "mpi4py", *, group=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        init_mpi()
        from mpi4py import MPI

        self._MPI = MPI
        self._SUM = MPI.SUM
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.backend = backend
        self._rank = self.comm.Get_rank()
        self._size = self.comm.Get_size()
        self._group = None
        if backend == "mlx":
            self._group = self._resolve_mlx_group(group)
        # MLX dtype -> numpy dtype that MPI can sum as is.
        self._np_dtypes = summable_dtypes(MPI)
        self._out = None  # see _out_buffer
        self._extra = None  # see all_sum_extra
        self._out_key = None
        # While set (moe_mpi.overlap.Interleave), all_sum hands its reduction
        # to overlap.reduce(), which runs other work while the message travels.
        self.overlap = None
        self.overlapped = 0  # all-reduces that let other work run meanwhile
        self.stats: dict[str, CollectiveStats] = {}
        self.reset_stats()

    def _resolve_mlx_group(self, group):
        MPI = self._MPI
        if group is None:
            if self._size == 1:
                # Nothing to reduce with; all_sum short-circuits on size 1.
                return mlx_group()
            if MPI.Comm.Compare(self.comm, MPI.COMM_WORLD) not in (
                MPI.IDENT,
                MPI.CONGRUENT,
            ):
                raise ValueError(
                    "backend='mlx' without an explicit group needs a communicator "
                    "congruent with MPI.COMM_WORLD (MLX's global group)"
                )
            group = mlx_group()
            if group is None:
                raise RuntimeError(
                    "backend='mlx' is unavailable: MLX's MPI backend does not share "
                    f"this MPI world of size {MPI.COMM_WORLD.Get_size()}. MPI can be "
                    "initialised only once per process; MLX must initialise it "
                    "first (create the Communicator, or call moe_mpi.comm.init_mpi(), "
                    "before anything runs `from mpi4py import MPI` with the default "
                    "mpi4py.rc.initialize=True), and MLX_MPI_LIBNAME must point at "
                    "the real libmpi shared object (currently "
                    f"{os.environ.get('MLX_MPI_LIBNAME')!r})."
                )
        if group.size() != self._size or group.rank() != self._rank:
            raise ValueError(
                f"MLX group (rank {group.rank()}, size {group.size()}) does not match "
                f"the communicator (rank {self._rank}, size {self._size})"
            )
        return group

    # ------------------------------------------------------------------ info

    @property
    def rank(self) -> int:
        """This process's rank in ``comm``."""
        return self._rank

    @property
    def size(self) -> int:
        """Number of processes in ``comm``."""
        return self._size

    @property
    def mlx_group(self):
        """The ``mx.distributed.Group`` of the ``"mlx"`` backend, else ``None``."""
        return self._group

    def __repr__(self) -> str:
        return (
            f"Communicator(rank={self._rank}, size={self._size}, "
            f"backend={self.backend!r})"
        )

    # ----------------------------------------------------------------- stats

    def reset_stats(self) -> None:
        """Zero all counters."""
        self.stats = {kind: CollectiveStats() for kind in KINDS}
        self._all_sum_stats = self.stats["all_sum"]  # all_sum's hot path
        self.overlapped = 0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Counters as a JSON-serialisable ``{kind: {calls, bytes, seconds}}``."""
        return {kind: dataclasses.asdict(s) for kind, s in self.stats.items()}

    def _record(self, kind: str, nbytes: int, start: float) -> None:
        self.stats[kind].add(nbytes, time.perf_counter() - start)

    @property
    def lazy(self) -> bool:
        """Whether :meth:`all_sum` of an ``mx.array`` leaves the reduction in MLX's graph (backend ``"mlx"``)."""
        return self.backend == "mlx" and self._size > 1

    def _enter(self, kind: str) -> None:
        settle()  # one thread at a time in MPI: the all-reduces on their way finish first
        if self._size > 1:
            ACTIVITY.enter(kind)

    def _leave(self) -> None:
        if self._size > 1:
            ACTIVITY.leave()

    # ----------------------------------------------------------- collectives

    def all_sum(self, x):
        """Sum ``x`` over all ranks: the one collective of an MoE layer.

        Args:
            x: An ``mx.array``, or a C-contiguous float32 numpy array (the
                numpy decode step's partial sums), of the same shape and
                dtype on every rank. Any numeric dtype except bool.

        Returns:
            For an ``mx.array``, a new array with the shape and dtype of ``x``
            holding the elementwise sum; the reduction itself has completed
            on return, only a float32 -> 16-bit cast of the mpi4py path is
            left lazy, to run inside the caller's next evaluation. For a
            numpy array, ``x`` itself holding the sum (reduced in place; a
            new array with the ``"mlx"`` backend). On a single rank, ``x``
            itself: nothing to reduce, but the call is still counted, so
            "one all-reduce per MoE layer" holds on any number of ranks.

        Raises:
            TypeError: ``x`` is bool or a dtype MPI cannot sum.
        """
        if isinstance(x, np.ndarray):
            return self._all_sum_numpy(x)
        if self._size == 1:
            if x.dtype == mx.bool_:
                raise TypeError("all_sum does not support bool arrays")
            start = time.perf_counter()
            self._record("all_sum", 0, start)
            return x
        if self.backend == "mlx":
            return self._all_sum_mlx(x)
        if self.overlap is not None:
            return self._all_sum_overlapped(x)
        if pending():  # another communicator's, in MLX's graph
            settle()
        # memoryview() evaluates x (MLX's buffer export does) before the timer
        # starts, so the counters measure communication, not the expert
        # computation feeding it. The view is zero-copy.
        send = memoryview(x)
        start = time.perf_counter()
        activity = ACTIVITY
        activity.entered += 1  # for the watchdog (see mpi_activity)
        try:  # free unless it raises (Python >= 3.11)
            if (send.shape, send.format) == self._out_key and send.c_contiguous:
                # The hot path, inline: same shape and dtype as the last call.
                out_view = self._out[1]
                self.comm.Allreduce(send, out_view, op=self._SUM)
                out = mx.array(out_view)
            else:
                out = self._all_sum_mpi4py(x, send)
        finally:
            activity.left += 1
        # _record, inlined: this runs once per MoE layer per decode step.
        stats = self._all_sum_stats
        stats.calls += 1
        stats.bytes += send.nbytes
        stats.seconds += time.perf_counter() - start
        return out

    def all_sum_extra(self, x, extra: np.ndarray):
        """:meth:`all_sum` of ``x`` with a few float32 columns per row in the same message.

        For checks that ride along with a layer's one all-reduce
        (:mod:`moe_mpi.guard`). The message is float32 ``[T, D + m]``: ``x``
        widened exactly, then ``extra``. A float32 ``x`` sums to the values
        :meth:`all_sum` gives (the same MPI sum of the same numbers);
        bfloat16 and float16 are summed in float32 and rounded once, as the
        mpi4py path of :meth:`all_sum` does for bfloat16 (for float16 it
        would sum natively in 16 bits instead). Counted as one ``all_sum``.

        Args:
            x: ``mx.array`` (float32, bfloat16 or float16) or C-contiguous
                float32 numpy array, ``[..., D]``, ``T`` rows in all.
            extra: float32 ``[T, m]``.

        Returns:
            ``(sum of x, sum of extra)``: the first as :meth:`all_sum` returns
            it (a numpy ``x`` is overwritten in place), the second a new
            ``[T, m]`` numpy array.

        Raises:
            ValueError: The ``"mlx"`` backend (its message is MLX's own), or
                ``extra`` has not ``T`` rows.
        """
        if self.backend == "mlx" and self._size > 1:
            raise ValueError("all_sum_extra needs backend='mpi4py'")
        d = x.shape[-1]
        t = x.size // d if d else 0
        if extra.shape[0] != t:
            raise ValueError(f"extra has {extra.shape[0]} rows; x has {t} rows of {d}")
        m = extra.shape[1]
        if self.overlap is None:  # overlapping, the wire thread takes this call in its turn
            settle()
        start = time.perf_counter()
        buf = self._extra
        if self.overlap is not None and self._size > 1:
            buf = np.empty((t, d + m), dtype=np.float32)  # another call may start before this one ends
        elif buf is None or buf.shape != (t, d + m):
            buf = self._extra = np.empty((t, d + m), dtype=np.float32)
        head = buf[:, :d]
        if isinstance(x, np.ndarray):
            np.copyto(head, x.reshape(t, d))
        else:
            view = memoryview(x)  # evaluates x
            if x.dtype == mx.bfloat16 and view.c_contiguous:
                bits = np.frombuffer(view.cast("B"), np.uint16).reshape(t, d)
                np.left_shift(bits, 16, out=head.view(np.uint32), dtype=np.uint32)  # exact widening
            elif x.dtype in (mx.float32, mx.float16) and view.c_contiguous:
                np.copyto(head, np.asarray(view).reshape(t, d))
            else:
                np.copyto(head, np.asarray(memoryview(x.astype(mx.float32))).reshape(t, d))
        buf[:, d:] = extra
        paused = 0.0
        if self._size > 1 and self.overlap is not None:
            paused = self._reduce_overlapped(buf)
        elif self._size > 1:
            activity = ACTIVITY
            activity.entered += 1
            try:
                self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._SUM)
            finally:
                activity.left += 1
        if isinstance(x, np.ndarray):
            x.reshape(t, d)[...] = head
            out = x
        else:
            out = mx.array(np.ascontiguousarray(head)).reshape(x.shape)
            if x.dtype != mx.float32:
                out = out.astype(x.dtype)  # lazy, as in all_sum
        self._all_sum_stats.add(buf.nbytes if self._size > 1 else 0, time.perf_counter() - start - paused)
        return out, buf[:, d:].copy()

    def all_gather(self, x: mx.array, sizes: Sequence[int]) -> mx.array:
        """Every rank's ``x`` joined along the last axis, in rank order: the split LM head's logits.

        Args:
            x: ``[..., sizes[rank]]``, the same leading shape and dtype on every rank.
            sizes: Every rank's last-axis width (:mod:`moe_mpi.vocab`).

        Returns:
            ``[..., sum(sizes)]``. Each message is padded to ``max(sizes)``
            so that every rank sends as much (a few columns at most).
        """
        if len(sizes) != self._size or x.shape[-1] != sizes[self._rank]:
            raise ValueError(f"all_gather: x has {x.shape[-1]} columns, sizes={list(sizes)} on {self._size} ranks")
        start = time.perf_counter()
        if self._size == 1:
            self._record("all_gather", 0, start)
            return x
        width = max(sizes)
        rows = x.reshape(-1, x.shape[-1])  # [M, sizes[rank]]
        if width > rows.shape[1]:
            rows = mx.pad(rows, [(0, 0), (0, width - rows.shape[1])])
        if self.lazy:
            parts = hold(mx.distributed.all_gather(rows[None], group=self._group, stream=collective_stream()))  # [N, M, width]
            self.stats["all_gather"].timed = False
        else:
            send = memoryview(mx.contiguous(rows)).cast("B")  # evaluates rows: the head's work, before the timer
            start = time.perf_counter()
            recv = np.empty(self._size * send.nbytes, dtype=np.uint8)
            self._enter("all_gather")
            self.comm.Allgather([send, self._MPI.BYTE], [recv, self._MPI.BYTE])
            self._leave()
            parts = mx.array(recv).view(x.dtype).reshape(self._size, rows.shape[0], width)
        out = mx.concatenate([parts[r, :, :n] for r, n in enumerate(sizes)], axis=1)  # [M, vocab]
        self._record("all_gather", x.nbytes, start)
        return out.reshape(*x.shape[:-1], sum(sizes))

    def _all_sum_numpy(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise TypeError(f"all_sum of a numpy array takes C-contiguous float32, not {x.dtype}")
        start = time.perf_counter()
        if self._size > 1:
            settle()  # one thread at a time in MPI
            activity = ACTIVITY
            activity.entered += 1
            if self.backend == "mlx":
                out = mx.distributed.all_sum(mx.array(x), group=self._group, stream=collective_stream())
                mx.eval(out)
                x = np.array(memoryview(out))
            else:
                self.comm.Allreduce(self._MPI.IN_PLACE, x, op=self._SUM)
            activity.left += 1
        stats = self._all_sum_stats
        stats.calls += 1
        stats.bytes += x.nbytes if self._size > 1 else 0
        stats.seconds += time.perf_counter() - start
        return x

    def _all_sum_mlx(self, x: mx.array) -> mx.array:
        if x.dtype == mx.bool_:
            raise TypeError("all_sum does not support bool arrays")
        out = hold(mx.distributed.all_sum(x, group=self._group, stream=collective_stream()))  # lazy, run later
        stats = self._all_sum_stats
        stats.calls += 1
        stats.bytes += x.nbytes
        stats.timed = False
        return out

    def _all_sum_overlapped(self, x: mx.array) -> mx.array:
        """:meth:`all_sum` while :attr:`overlap` is set: other work runs while the message travels.

        The reduction works on a copy of its own (float32 for 16-bit
        floats, as :meth:`_all_sum_widened`), not the reused buffer, since
        another all-reduce may start before this one ends.
        """
        if x.dtype == mx.bool_:
            raise TypeError("all_sum does not support bool arrays")
        start = time.perf_counter()
        cast = None
        if x.dtype in self._np_dtypes:
            buf = np.array(memoryview(x))  # evaluates x; a C-contiguous copy, whatever its strides
        elif x.dtype in (mx.bfloat16, mx.float16):
            buf = np.array(memoryview(x.astype(mx.float32)))
            cast = x.dtype
        else:
            raise TypeError(f"all_sum does not support dtype {x.dtype}")
        paused = self._reduce_overlapped(buf)
        out = mx.array(buf)
        self._all_sum_stats.add(x.nbytes, time.perf_counter() - start - paused)
        return out if cast is None else out.astype(cast)

    def _reduce_overlapped(self, buf: np.ndarray) -> float:
        """Sums ``buf`` over all ranks in place through :attr:`overlap`, which runs other work meanwhile.

        Returns the seconds not spent on this reduction (other work), so
        that the counters keep this call's own time.
        """
        activity = ACTIVITY
        activity.entered += 1
        try:
            other = self.overlap.reduce(self.comm, buf)
        finally:
            activity.left += 1
        self.overlapped += 1
        return other

    def _all_sum_mpi4py(self, x: mx.array, send: memoryview) -> mx.array:
        # Copies per call: none to get the send buffer (MPI reads MLX's
        # memory through the buffer protocol) unless x is not row-contiguous
        # or is upcast; one to get the result into MLX (mx.array(out)),
        # because MLX cannot adopt memory it did not allocate. Reducing
        # straight into an MLX array's buffer would avoid that copy, but only
        # by mutating an immutable array behind MLX's back.
        #
        # This is the decode hot path (one call per MoE layer), kept short:
        # memoryviews rather than numpy arrays, and the output buffer and its
        # view cached for the last (shape, format); MLX's buffer formats are
        # distinct per dtype (what it costs against raw mpi4py: `moe-mpi
        # bench collectives`, docs/benchmarks.md).
        if (send.shape, send.format) != self._out_key:
            if x.dtype not in self._np_dtypes:
                return self._all_sum_widened(x)
            self._out_buffer(send.shape, x.dtype)
        if not send.c_contiguous:
            # Transposed, strided or broadcast. MLX exports such arrays with
            # their strides and MPI would read the raw memory in order, which
            # is wrong data: copy into one buffer.
            send = np.ascontiguousarray(np.asarray(send))
        out_view = self._out[1]
        self.comm.Allreduce(send, out_view, op=self._SUM)
        return mx.array(out_view)

    def _all_sum_widened(self, x: mx.array) -> mx.array:
        """16-bit floats MPI cannot sum: reduce in float32, cast back."""
        MPI = self._MPI
        if x.dtype == mx.bool_:
            raise TypeError("all_sum does not support bool arrays")
        if x.dtype in (mx.bfloat16, mx.float16):
            # No MPI sum for this type: reduce in float32 (2x the bytes on the
            # wire) and round once at the end, at least as accurate as a
            # 16-bit reduction.
            out = self._upcast_float32(x)
            self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
            # Lazy: the cast back runs inside the caller's next evaluation
            # rather than costing a scheduler round trip here.
            return mx.array(out).astype(x.dtype)
        raise TypeError(f"all_sum does not support dtype {x.dtype}")

    def _upcast_float32(self, x: mx.array) -> np.ndarray:
        """Exact float32 copy of a 16-bit float array, in the reused buffer."""
        out, _ = self._out_buffer(tuple(x.shape), mx.float32)
        view = memoryview(x)
        if x.dtype == mx.float16:
            np.copyto(out, np.asarray(view))  # numpy widens float16 exactly
        elif view.c_contiguous:
            # bfloat16 (no numpy type) is the top half of a float32: widen
            # the bits and shift. Exact, and ~10x cheaper than
            # x.astype(mx.float32) + mx.eval for decode-sized messages.
            bits = np.frombuffer(view.cast("B"), np.uint16)  # flat, zero-copy
            # One pass: widen to uint32 and shift into the float32 buffer.
            wide = out.reshape(-1).view(np.uint32)
            np.left_shift(bits, 16, out=wide, dtype=np.uint32)
        else:
            # Non-contiguous bfloat16: let MLX gather and cast in one pass.
            np.copyto(out, np.asarray(memoryview(x.astype(mx.float32))))
        return out

    def _out_buffer(
        self, shape: tuple[int, ...], dtype: mx.Dtype
    ) -> tuple[np.ndarray, memoryview]:
        # One buffer, reused while the shape and dtype stay the same (every
        # layer of a decode step or of one prefill), so large reductions do
        # not page-fault a fresh allocation per call. Safe because
        # mx.array(out) copies before the next call; costs one message of
        # memory. The memoryview is cached too: MLX and MPI take it faster
        # than numpy. Keyed by the memoryview format of the MLX dtype.
        out = np.empty(shape, dtype=self._np_dtypes[dtype])
        self._out = (out, memoryview(out))
        self._out_key = (tuple(shape), buffer_format(dtype))
        return self._out

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """Broadcast a small msgpack-serialisable object from ``root``.

        The object is encoded with msgpack (never pickle, so a peer cannot make
        this rank execute code), its length is broadcast, then the bytes.
        msgpack round-trips dicts, lists, str, bytes, int, float, bool and
        None; tuples come back as lists. The same encode/decode happens on a
        single rank so behaviour does not depend on the world size.

        Args:
            obj: The object, significant on ``root`` only.
            root: Rank that owns ``obj``.

        Returns:
            The decoded object on every rank (including ``root``).

        Raises:
            TypeError: ``obj`` cannot be encoded (raised on every rank).
        """
        start = time.perf_counter()
        payload = b""
        error = None
        if self._rank == root:
            try:
                payload = msgpack.packb(obj, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                error = exc
        if self._size > 1:
            # Length -1 tells the other ranks that root failed to encode, so
            # they raise instead of waiting forever for the payload.
            length = np.array([-1 if error else len(payload)], dtype=np.int64)
            self._enter("bcast")
            self.comm.Bcast(length, root=root)
            n = int(length[0])
            if n >= 0:
                buf = bytearray(payload) if self._rank == root else bytearray(n)
                self.comm.Bcast(buf, root=root)
                payload = bytes(buf)
            self._leave()
        else:
            n = -1 if error else len(payload)
        if n < 0:
            self._record("bcast", 0, start)
            if error is not None:
                message = f"bcast: cannot msgpack-encode object: {error}"
                raise TypeError(message) from error
            raise TypeError(f"bcast: root {root} could not msgpack-encode its object")
        result = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        self._record("bcast", n if self._size > 1 else 0, start)
        return result

    def allgather(self, obj: Any) -> list[Any]:
        """Gather one small msgpack-serialisable object from every rank.

        Returns:
            List indexed by rank, identical on all ranks.
        """
        start = time.perf_counter()
        payload = msgpack.packb(obj, use_bin_type=True)
        if self._size == 1:
            parts = [payload]
            nbytes = 0
        else:
            counts = np.empty(self._size, dtype=np.int64)
            self._enter("allgather")
            self.comm.Allgather(np.array([len(payload)], dtype=np.int64), counts)
            displs = np.zeros(self._size, dtype=np.int64)
            np.cumsum(counts[:-1], out=displs[1:])
            buf = bytearray(int(counts.sum()))
            self.comm.Allgatherv(
                payload, [buf, (counts.tolist(), displs.tolist()), self._MPI.BYTE]
            )
            self._leave()
            parts = [bytes(buf[d : d + c]) for d, c in zip(displs, counts)]
            nbytes = len(payload)
        result = [msgpack.unpackb(p, raw=False, strict_map_key=False) for p in parts]
        self._record("allgather", nbytes, start)
        return result

    def allreduce_max(self, value: float) -> float:
        """Maximum of a Python number over all ranks (e.g. the slowest rank's time)."""
        start = time.perf_counter()
        if self._size == 1:
            result = float(value)
            nbytes = 0
        else:
            buf = np.array([value], dtype=np.float64)
            self._enter("allreduce_max")
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
            self._leave()
            result = float(buf[0])
            nbytes = buf.nbytes
        self._record("allreduce_max", nbytes, start)
        return result

    # ------------------------------------------------------- point to point
    # Used by the central-router mode (moe_mpi.central), which this library
    # measures itself against; counted like the collectives.

    def send_array(self, buf: np.ndarray, dest: int, tag: int = 0) -> None:
        """Send a contiguous numpy buffer as raw bytes (no pickling, no copy)."""
        start = time.perf_counter()
        self._enter("send")
        self.comm.Send([buf, self._MPI.BYTE], dest=dest, tag=tag)
        self._leave()
        self._record("send", buf.nbytes, start)

    def recv_array(self, shape: tuple, dtype, source: int, tag: int = 0) -> np.ndarray:
        """Receive a buffer sent by :meth:`send_array` into a new numpy array."""
        start = time.perf_counter()
        buf = np.empty(shape, dtype=dtype)
        self._enter("recv")
        self.comm.Recv([buf, self._MPI.BYTE], source=source, tag=tag)
        self._leave()
        self._record("recv", buf.nbytes, start)
        return buf

    def send_obj(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send a small msgpack-serialisable object (metadata)."""
        start = time.perf_counter()
        payload = msgpack.packb(obj, use_bin_type=True)
        self._enter("send")
        self.comm.Send([payload, self._MPI.BYTE], dest=dest, tag=tag)
        self._leave()
        self._record("send", len(payload), start)

    def recv_obj(self, source: int, tag: int = 0) -> Any:
        """Receive an object sent by :meth:`send_obj`."""
        start = time.perf_counter()
        status = self._MPI.Status()
        self._enter("recv")
        self.comm.Probe(source=source, tag=tag, status=status)
        buf = bytearray(status.Get_count(self._MPI.BYTE))
        self.comm.Recv([buf, self._MPI.BYTE], source=source, tag=tag)
        self._leave()
        self._record("recv", len(buf), start)
        return msgpack.unpackb(bytes(buf), raw=False, strict_map_key=False)

    def barrier(self) -> None:
        """Block until every rank has called :meth:`barrier`."""
        start = time.perf_counter()
        if self._size > 1:
            self._enter("barrier")
            self.comm.Barrier()
            self._leave()
        self._record("barrier", 0, start)

    def abort(self, code: int = 1) -> None:
        """Terminate every rank of ``comm`` (never returns).

        Use when a rank hits an error the others cannot learn about: they
        would otherwise block forever in their next collective.
        """
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # closed or broken stream; aborting anyway
        self.comm.Abort(code)
