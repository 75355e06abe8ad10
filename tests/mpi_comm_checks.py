"""Rank-side checks for moe_mpi.comm, run under mpirun by tests/test_comm.py.

Usage::

    mpirun -n N python -m mpi4py tests/mpi_comm_checks.py [--backend B] CHECK...

Each CHECK names a ``check_*`` function below (``all`` runs every one that is
meant to pass), or is one of STARTUP_CHECKS, which must run alone because they
control how MPI gets initialised. Every rank prints
``OK <check> rank=<r> size=<n>`` after a check passes; an exception on any
rank aborts the whole job (``-m mpi4py`` does that, and so does :func:`main`
when the script is run plainly) so a failure can never leave the other ranks
blocked in a collective.

Values are chosen so every sum is exact in the tested dtype: results are
compared with ``==``, not a tolerance.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import mlx.core as mx
import numpy as np

from moe_mpi.comm import KINDS, Communicator

# Shapes covering scalar, vector, decode-sized and higher-rank arrays.
SHAPES = [(), (7,), (1, 768), (2, 3, 5)]


def _contribution(shape, rank: int, dtype) -> np.ndarray:
    """Rank-dependent values whose sum over <= 3 ranks is exact in ``dtype``.

    Small multiples of 1/2 scaled by (rank + 1): the sum over 3 ranks is at
    most 6 * 15 * 0.5 = 45, which needs < 8 significant bits (bfloat16 has 8).
    A few entries are large powers of two to exercise the exponent range.
    """
    n = int(np.prod(shape, dtype=np.int64))
    k = (np.arange(n) % 31) - 15  # -15 .. 15
    values = (k * 0.5 * (rank + 1)).astype(np.float64)
    if n >= 4 and dtype != mx.float16:  # float16 overflows at 65504
        values[3] = 2.0**20 * (rank + 1)
    return values.reshape(shape)


def _expected(shape, size: int, dtype) -> np.ndarray:
    return sum(_contribution(shape, r, dtype) for r in range(size))


def _check_all_sum_dtype(comm: Communicator, dtype) -> None:
    for shape in SHAPES:
        x = mx.array(_contribution(shape, comm.rank, dtype)).astype(dtype)
        y = comm.all_sum(x)
        assert y.dtype == dtype, (y.dtype, dtype)
        assert y.shape == x.shape, (y.shape, x.shape)
        got = np.array(y.astype(mx.float32))
        want = _expected(shape, comm.size, dtype).astype(np.float32)
        assert np.array_equal(got, want), (dtype, shape, got, want)


def check_all_sum_float32(comm: Communicator) -> None:
    _check_all_sum_dtype(comm, mx.float32)


def check_all_sum_numpy(comm: Communicator) -> None:
    """A numpy float32 array (the numpy decode step's partial sums): summed, counted as an all_sum."""
    before = comm.snapshot()["all_sum"]["calls"]
    for shape in SHAPES:
        x = _contribution(shape, comm.rank, mx.float32).astype(np.float32)
        y = comm.all_sum(x)
        assert y.shape == x.shape and y.dtype == np.float32, (y.shape, y.dtype)
        assert np.array_equal(y, _expected(shape, comm.size, mx.float32).astype(np.float32)), shape
    assert comm.snapshot()["all_sum"]["calls"] - before == len(SHAPES)


def check_all_sum_float16(comm: Communicator) -> None:
    _check_all_sum_dtype(comm, mx.float16)


def check_all_sum_bfloat16(comm: Communicator) -> None:
    _check_all_sum_dtype(comm, mx.bfloat16)


def check_all_sum_int32(comm: Communicator) -> None:
    x = mx.arange(10, dtype=mx.int32) * (comm.rank + 1)
    y = comm.all_sum(x)
    assert y.dtype == mx.int32
    total = comm.size * (comm.size + 1) // 2
    assert y.tolist() == [i * total for i in range(10)], y.tolist()


def check_all_sum_views(comm: Communicator) -> None:
    # Non-contiguous inputs: transpose, strided slice, offset, broadcast.
    r = comm.rank + 1
    total = comm.size * (comm.size + 1) // 2
    ref = np.arange(12, dtype=np.float32).reshape(3, 4) * total
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        base = (mx.arange(12, dtype=mx.float32).reshape(3, 4) * r).astype(dtype)
        bcast = mx.broadcast_to(mx.array([2.0 * r], dtype=dtype), (2, 3))
        cases = [
            (base.T, ref.T),
            (base[:, 1::2], ref[:, 1::2]),
            (base[1:], ref[1:]),
            (bcast, np.full((2, 3), 2.0 * total)),
        ]
        for x, want in cases:
            y = comm.all_sum(x)
            assert y.shape == x.shape and y.dtype == dtype, (y.shape, y.dtype)
            got = np.array(y.astype(mx.float32))
            assert np.array_equal(got, want), (dtype, got, want)


def check_all_sum_repeated_shapes(comm: Communicator) -> None:
    # The mpi4py path reuses its output buffer: earlier results must not
    # change when later calls (same or different shape) reuse it.
    r = comm.rank + 1
    total = comm.size * (comm.size + 1) // 2
    results = []
    for i, shape in enumerate([(2, 8), (2, 8), (3,), (2, 8)]):
        for dtype in (mx.float32, mx.bfloat16):
            x = mx.full(shape, float(i + 1) * r, dtype=dtype)
            results.append((comm.all_sum(x), float(i + 1) * total))
    for y, want in results:
        assert np.all(np.array(y.astype(mx.float32)) == want), (y, want)


def check_all_sum_lazy_input(comm: Communicator) -> None:
    # An unevaluated graph as input: all_sum evaluates it first.
    x = mx.ones((4, 4)) * (comm.rank + 1) + 1
    y = comm.all_sum(x)
    want = sum(r + 2 for r in range(comm.size))
    assert np.array_equal(np.array(y), np.full((4, 4), want, np.float32))


def check_all_sum_rejects_bool(comm: Communicator) -> None:
    try:
        comm.all_sum(mx.array([True, False]))
    except TypeError:
        return
    raise AssertionError("bool all_sum did not raise TypeError")


def check_bcast(comm: Communicator) -> None:
    obj = {
        "prompt": "héllo",
        "tokens": [1, 2, 3],
        "temp": 0.5,
        "raw": b"\x00\xff",
        "flags": {"stop": False, "none": None},
        7: "int key",
    }
    for root in sorted({0, comm.size - 1}):
        got = comm.bcast(obj if comm.rank == root else None, root=root)
        assert got == obj, got
    # Tuples come back as lists (msgpack has one array type).
    assert comm.bcast((1, 2) if comm.rank == 0 else None) == [1, 2]
    assert comm.bcast(None) is None


def check_bcast_unencodable(comm: Communicator) -> None:
    # The root cannot encode a set; every rank must raise, none may hang.
    try:
        comm.bcast({1, 2} if comm.rank == 0 else None)
    except TypeError:
        pass
    else:
        raise AssertionError("bcast of a set did not raise TypeError")
    comm.barrier()  # still in step afterwards
    assert comm.bcast("after" if comm.rank == 0 else None) == "after"


def check_allgather_and_max(comm: Communicator) -> None:
    got = comm.allgather({"rank": comm.rank, "pad": "x" * comm.rank})
    assert got == [{"rank": r, "pad": "x" * r} for r in range(comm.size)], got
    assert comm.allreduce_max(float(comm.rank) * 1.5) == (comm.size - 1) * 1.5


def check_all_gather(comm: Communicator) -> None:
    """Uneven widths joined in rank order along the last axis (the split LM head's logits), each dtype."""
    sizes = [5 + 2 * r for r in range(comm.size)]  # uneven: every message is padded to the widest
    total = sum(sizes)
    start = sum(sizes[: comm.rank])
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for lead in ((1, 3), (2, 1), (4,)):
            whole = mx.arange(int(np.prod(lead)) * total, dtype=mx.float32).reshape(*lead, total).astype(dtype)
            part = whole[..., start : start + sizes[comm.rank]]  # a strided view: gathered as its values
            before = comm.snapshot().get("all_gather", {}).get("calls", 0)
            got = comm.all_gather(part, sizes)
            assert got.shape == whole.shape and got.dtype == dtype, (got.shape, got.dtype)
            assert mx.array_equal(got, whole).item(), (dtype, lead)
            assert comm.snapshot()["all_gather"]["calls"] == before + 1
    try:
        comm.all_gather(mx.zeros((2, sizes[comm.rank] + 1)), sizes)
    except ValueError as e:
        assert "all_gather" in str(e), e
    else:
        raise AssertionError("all_gather of the wrong width did not raise")


def check_counters(comm: Communicator) -> None:
    comm.reset_stats()
    assert all(s.calls == 0 and s.bytes == 0 for s in comm.stats.values())
    n_layers, n_forward = 3, 4
    x = mx.zeros((1, 768), dtype=mx.bfloat16)  # 1536 bytes
    for _ in range(n_forward):
        for _ in range(n_layers):
            x = comm.all_sum(x)
    payload = comm.bcast({"k": "v"} if comm.rank == 0 else None)
    comm.barrier()
    comm.barrier()
    moved = comm.size > 1  # a single rank moves nothing
    s = comm.stats
    assert s["all_sum"].calls == n_layers * n_forward, s
    assert s["all_sum"].bytes == (n_layers * n_forward * 1536 if moved else 0), s
    assert s["bcast"].calls == 1
    import msgpack

    assert s["bcast"].bytes == (len(msgpack.packb(payload)) if moved else 0), s
    assert s["barrier"].calls == 2 and s["barrier"].bytes == 0, s
    assert s["all_sum"].seconds >= 0.0
    snap = comm.snapshot()
    import json

    assert json.loads(json.dumps(snap)) == snap
    assert set(snap) == set(KINDS)
    assert snap["all_sum"]["calls"] == n_layers * n_forward
    comm.reset_stats()
    assert comm.stats["all_sum"].calls == 0


def check_size_one_identity(comm: Communicator) -> None:
    # On one rank all_sum is the identity and returns its input unchanged.
    x = mx.arange(5, dtype=mx.float32)
    y = comm.all_sum(x)
    if comm.size == 1:
        assert y is x
    else:
        assert np.array_equal(np.array(y), np.arange(5) * comm.size)


def check_info(comm: Communicator) -> None:
    from mpi4py import MPI

    assert comm.size == MPI.COMM_WORLD.Get_size()
    assert comm.rank == MPI.COMM_WORLD.Get_rank()
    if comm.backend == "mlx" and comm.size > 1:
        group = comm.mlx_group
        assert group.size() == comm.size and group.rank() == comm.rank
    again = Communicator(backend=comm.backend)  # init_mpi is idempotent
    assert again.size == comm.size
    assert again.all_sum(mx.array([1.0])).item() == comm.size


def check_fail_on_last_rank(comm: Communicator) -> None:
    # Negative check: the last rank fails while the others wait in a
    # collective; the job must abort instead of hanging.
    if comm.rank == comm.size - 1:
        raise RuntimeError("deliberate failure on the last rank")
    comm.barrier()


CHECKS = {
    name[len("check_") :]: fn
    for name, fn in sorted(globals().items())
    if name.startswith("check_") and callable(fn)
}
# Checks left out of "all" because they are meant to fail.
SPECIAL = {"fail_on_last_rank"}


def mlx_after_mpi4py_init() -> None:
    """mpi4py initialises MPI before MLX: backend='mlx' must refuse clearly."""
    import mpi4py

    mpi4py.rc.initialize = True
    from mpi4py import MPI  # initialises MPI, so MLX cannot join it

    if MPI.COMM_WORLD.Get_size() == 1:
        # Nothing to reduce with: the mlx backend still works on one rank.
        comm = Communicator(backend="mlx")
        assert comm.all_sum(mx.array([2.0])).item() == 2.0
        return
    try:
        Communicator(backend="mlx")
    except RuntimeError as exc:
        assert "initialised only once" in str(exc), exc
    else:
        raise AssertionError("backend='mlx' after mpi4py init did not raise")
    comm = Communicator(backend="mpi4py")  # the mpi4py path still works
    assert comm.all_sum(mx.array([1.0])).item() == comm.size


def mlx_initialised_first() -> None:
    """MLX initialised MPI before moe_mpi (mx.distributed.init()): both work."""
    from moe_mpi.mpi_init import default_mlx_mpi_libname

    default_mlx_mpi_libname()
    group = mx.distributed.init()
    for backend in ("mlx", "mpi4py"):
        comm = Communicator(backend=backend)
        assert comm.size == group.size(), (comm.size, group.size())
        assert comm.all_sum(mx.array([1.0])).item() == comm.size


# Checks that need their own process (they control MPI initialisation).
STARTUP_CHECKS = {
    "mlx_after_mpi4py_init": mlx_after_mpi4py_init,
    "mlx_initialised_first": mlx_initialised_first,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="mpi4py", choices=("mpi4py", "mlx"))
    parser.add_argument("checks", nargs="+")
    args = parser.parse_args(argv)

    if len(args.checks) == 1 and args.checks[0] in STARTUP_CHECKS:
        STARTUP_CHECKS[args.checks[0]]()
        _report(args.checks[0])
        return

    comm = Communicator(backend=args.backend)
    names = sorted(set(CHECKS) - SPECIAL) if args.checks == ["all"] else args.checks
    try:
        for name in names:
            CHECKS[name](comm)
            print(f"OK {name} rank={comm.rank} size={comm.size}", flush=True)
    except Exception:  # noqa: BLE001 - any failure must take the job down
        traceback.print_exc()
        comm.abort(1)


def _report(name: str) -> None:
    from mpi4py import MPI

    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    print(f"OK {name} rank={rank} size={size}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
