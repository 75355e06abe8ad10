"""Latency of the sum all-reduce data paths of moe_mpi.comm.

Run on two ranks::

    mpirun -n 2 python examples/allreduce_paths.py

(as root add ``--allow-run-as-root``; more ranks than cores need
``--oversubscribe``.) Paths, each timed per call after warm-up:

* ``numpy floor``: ``MPI.COMM_WORLD.Allreduce`` numpy -> preallocated numpy,
  the least any Python path can cost.
* ``Communicator mpi4py``: ``Communicator(backend="mpi4py").all_sum`` on an
  evaluated ``mx.array`` (host view -> Allreduce -> ``mx.array``).
* ``Communicator mlx``: ``Communicator(backend="mlx").all_sum``, i.e.
  ``mx.distributed.all_sum`` + ``mx.eval`` on MLX's MPI group.

Every call is timed; each rank computes the median (p50) and the mean over
all calls, and the table shows the maximum over ranks (the slowest rank bounds
a collective). On a loaded machine the mean is dominated by rare scheduler
stalls (multiples of the 4 ms kernel tick when a spinning rank is preempted),
so p50 (and min, for large messages) is the better estimate of the cost of
the path itself. Rank 0 prints
the table (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import numpy as np

from moe_mpi.comm import Communicator

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.lower().split("x"))


def _format_size(nbytes: int) -> str:
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:g} {unit}"
    return f"{nbytes} B"


def _iters_for(nbytes: int, base_iters: int) -> int:
    # Cap each measurement at ~1 GiB per rank so large messages finish
    # quickly, but never below 10 calls.
    return max(10, min(base_iters, (1 << 30) // max(nbytes, 1)))


def _time_calls(comm: Communicator, fn, iters: int, warmup: int) -> dict[str, float]:
    """Min, p50 and mean seconds per call of ``fn``, each maximised over ranks."""
    for _ in range(warmup):
        fn()
    from mpi4py import MPI

    samples = np.empty(iters)
    clock = MPI.Wtime
    comm.comm.Barrier()
    for i in range(iters):
        start = clock()
        fn()
        samples[i] = clock() - start
    return {
        "min": comm.allreduce_max(float(samples.min())),
        "p50": comm.allreduce_max(float(np.median(samples))),
        "mean": comm.allreduce_max(float(samples.mean())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default="1x768,1x4096,1024x1024,16384x1024",
        help="comma-separated message shapes; 1xH is one decode token of "
        "hidden size H (1x768 float32 = 3 KiB), 1024x1024 float32 = 4 MiB, "
        "16384x1024 float32 = 64 MiB",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--json", default=None, help="write results here (rank 0)")
    args = parser.parse_args()

    # The mlx backend must initialise MPI, so the mlx Communicator is created
    # before anything else touches mpi4py (Communicator() handles the order).
    comm_mlx = Communicator(backend="mlx")
    comm_np = Communicator(backend="mpi4py")
    from mpi4py import MPI

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = _MX_DTYPES[dtype_name]
        for shape_text in args.shapes.split(","):
            shape = _parse_shape(shape_text)
            x = mx.random.normal(shape).astype(dtype)
            mx.eval(x)
            nbytes = x.nbytes
            iters = _iters_for(nbytes, args.iters)
            warmup = min(args.warmup, iters)

            paths = {}
            if dtype_name != "bfloat16":  # no numpy/MPI bfloat16 type
                send = np.asarray(memoryview(x))
                recv = np.empty_like(send)
                paths["numpy floor"] = lambda s=send, r=recv: comm_np.comm.Allreduce(
                    s, r, op=MPI.SUM
                )
            paths["Communicator mpi4py"] = lambda x=x: comm_np.all_sum(x)
            paths["Communicator mlx"] = lambda x=x: comm_mlx.all_sum(x)

            for path, fn in paths.items():
                t = _time_calls(comm_np, fn, iters, warmup)
                rows.append(
                    {
                        "dtype": dtype_name,
                        "shape": list(shape),
                        "bytes": nbytes,
                        "path": path,
                        "iters": iters,
                        "min_us": t["min"] * 1e6,
                        "p50_us": t["p50"] * 1e6,
                        "mean_us": t["mean"] * 1e6,
                        "p50_GB_per_s": nbytes / t["p50"] / 1e9,
                    }
                )
            del x, paths

    if comm_np.rank == 0:
        print(f"ranks={comm_np.size}; per call, max over ranks")
        header = (
            f"{'dtype':9} {'shape':>11} {'bytes':>9} {'path':20} "
            f"{'min us':>9} {'p50 us':>9} {'mean us':>9} {'p50 GB/s':>8}"
        )
        print(header)
        for row in rows:
            shape = "x".join(str(d) for d in row["shape"])
            print(
                f"{row['dtype']:9} {shape:>11} {_format_size(row['bytes']):>9} "
                f"{row['path']:20} {row['min_us']:9.1f} {row['p50_us']:9.1f} "
                f"{row['mean_us']:9.1f} "
                f"{row['p50_GB_per_s']:8.2f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": comm_np.size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
