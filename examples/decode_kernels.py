"""Probe the CPU kernels a decode step is made of (the figures in docs/benchmarks.md).

Run with as many ranks as the benchmarks use, so that the ranks share memory
bandwidth as they do in a decode step (each rank prints; rank 0 first):

    mpirun -n 2 .venv/bin/python examples/decode_kernels.py

It measures, on this rank's own copies of dbrx-like shapes:

* matrix-vector products (one row) through moe_mpi's compiled loop
  (:func:`moe_mpi.cpu.gemv.matvec` on ``[out, in]`` weights, what decode uses)
  and numpy's BLAS ``sgemv`` on a numpy view of the weights, stored
  ``[out, in]`` as in the checkpoint (``sgemv`` "T") and ``[in, out]`` as
  moe_mpi stores host-path experts without the compiled loop (``sgemv``
  "N"), against MLX's ``x @ W.T`` (BLAS ``sgemm``) and ``gather_mm``;
* a few rows (2, 4, 8) through numpy and MLX;
* the cost of small MLX ops on the CPU stream (an add, ``rms_norm``, RoPE),
  evaluated alone and chained.

Weights are cycled over more memory than the caches hold, and each figure is
the best of a few passes; GB/s counts each weight byte once.
"""

import os
import time

import moe_mpi  # noqa: F401  (loads OpenBLAS for MLX, one thread per rank)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moe_mpi.cpu import gemv

TOTAL_BYTES = 400e6  # per shape: well beyond the 32 MiB L3 here
PASSES = 3


def _best(fn, passes=PASSES):
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matvec(rank_tag: str, shape, rows_list=(1, 2, 4, 8)) -> None:
    count = int(TOTAL_BYTES / (shape[0] * shape[1] * 4))
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]
    host_t = [np.ascontiguousarray(w.T) for w in host]  # [in, out] in memory
    dev = [mx.array(w) for w in host]
    mx.eval(dev)
    nbytes = count * host[0].nbytes
    for rows in rows_list:
        x = rng.standard_normal((rows, shape[1]), dtype=np.float32)
        xm = mx.array(x)
        v = x[0]
        if rows == 1:
            numpy_s = _best(lambda: [w @ v for w in host])
            numpy_t_s = _best(lambda: [w.T @ v for w in host_t])
        else:
            numpy_s = _best(lambda: [w @ x.T for w in host])
            numpy_t_s = _best(lambda: [w.T @ x.T for w in host_t])
        xs = v if rows == 1 else x
        loop_s = _best(lambda: [gemv.matvec(w, xs) for w in host])
        mlx_s = _best(lambda: mx.eval([xm @ w.T for w in dev]))
        idx = mx.zeros((rows,), dtype=mx.uint32)
        gather_s = _best(
            lambda: mx.eval([mx.gather_mm(xm, w.T[None], rhs_indices=idx) for w in dev])
        )
        print(
            f"{rank_tag} {shape[0]}x{shape[1]} rows={rows}: moe_mpi gemv {nbytes / loop_s / 1e9:5.1f} GB/s"
            f" | numpy [out,in] {nbytes / numpy_s / 1e9:5.1f}"
            f" | numpy [in,out] {nbytes / numpy_t_s / 1e9:5.1f} | mlx matmul {nbytes / mlx_s / 1e9:5.1f} | mlx gather_mm {nbytes / gather_s / 1e9:5.1f}",
            flush=True,
        )


def small_ops(rank_tag: str) -> None:
    x = mx.random.normal((1, 1, 768))
    q = mx.random.normal((1, 12, 1, 64))
    w = mx.ones((768,))
    rope = nn.RoPE(64, base=1e6)
    mx.eval(x, q, w)

    def per_call(fn, n=300):
        for _ in range(20):
            fn()
        return _best(lambda: [fn() for _ in range(n)], 2) / n * 1e6

    def chained(op, start, n=20):
        def run():
            y = start
            for _ in range(n):
                y = op(y)
            mx.eval(y)

        return per_call(run, 50) / n

    ops = {
        "add": lambda y: y + 1,
        "rms_norm": lambda y: mx.fast.rms_norm(y, w, 1e-6),
        "rope": lambda y: rope(y, offset=30),
    }
    for name, op in ops.items():
        start = q if name == "rope" else x
        alone = per_call(lambda: mx.eval(op(start)))
        print(
            f"{rank_tag} mlx {name}: {alone:6.1f} us evaluated alone, "
            f"{chained(op, start):6.1f} us per op chained",
            flush=True,
        )


def main() -> None:
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    tag = f"[rank {rank}/{size}]"
    if rank == 0:
        print(f"# moe_mpi gemv: {gemv.describe()}", flush=True)
    matvec(tag, (2688, 768))  # an expert's gate/up projection (dbrx-like)
    matvec(tag, (768, 768), rows_list=(1,))  # an attention projection
    small_ops(tag)


if __name__ == "__main__":
    main()
