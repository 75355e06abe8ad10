"""Time a switch layer's two CPU expert kernels against each other, by rows per expert.

    .venv/bin/python examples/expert_kernels.py --model ~/.cache/moe_mpi/synthetic/<name>-q4

On one process, it loads the model (``mode="ep"``, every expert local) and
runs the first MoE layer's ``compute`` on random rows, ``E`` experts with
``r`` rows each, with

* ``dense``: one matmul per expert and projection (``quantized_matmul`` for
  a quantized model), the CPU kernel :mod:`moe_mpi.cpu.experts` uses for
  float experts from ``MOE_MPI_DENSE_MIN_ROWS`` rows;
* ``gather``: the switch layer's own call (``gather_mm`` / ``gather_qmm``).

Each figure is the median of interleaved passes. It is what decided that
quantized experts stay on ``gather_qmm`` (docs/benchmarks.md).
"""

import argparse
import os
import time

import moe_mpi  # noqa: F401  (loads OpenBLAS for MLX)
import mlx.core as mx
import numpy as np

from moe_mpi import Communicator, load
from moe_mpi.cpu.experts import choose_kernels
from moe_mpi.experts import local_switch_layers


def time_compute(switch, kernel: str, rows: mx.array, ids: np.ndarray) -> float:
    """Seconds for ``switch.compute(rows, ids)`` with ``kernel`` ("dense" or "gather")."""
    os.environ["MOE_MPI_EXPERT_KERNEL"] = kernel  # read by choose_kernels
    switch.__dict__["cpu_kernels"] = choose_kernels(switch)
    start = time.perf_counter()
    mx.eval(switch.compute(rows, ids))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--experts", default="8,32,64", help="experts with rows, comma-separated")
    parser.add_argument("--rows", default="1,2,3,4,8,16,32", help="rows per expert, comma-separated")
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()

    model, _ = load(args.model, comm=Communicator(), mode="ep")
    switch = local_switch_layers(model)[0]
    if "cpu_kernels" not in switch.__dict__:
        raise SystemExit("the CPU expert kernels are off (MOE_MPI_CPU=0, or MLX not on the CPU)")
    d = model.args.hidden_size
    n = next(c for c in switch.children().values() if "weight" in c)["weight"].shape[0]
    rng = np.random.default_rng(0)
    print(f"{args.model}: {n} experts, hidden {d}, quantized={switch.cpu_kernels.quantized}")
    print("| experts | rows each | dense ms | gather ms | dense ÷ gather |")
    print("|---|---|---|---|---|")
    for e in (int(v) for v in args.experts.split(",")):
        for r in (int(v) for v in args.rows.split(",")):
            ids = np.repeat(rng.choice(n, min(e, n), replace=False), r)
            rng.shuffle(ids)
            rows = mx.random.normal((ids.size, d))
            mx.eval(rows)
            times = {"dense": [], "gather": []}
            for _ in range(args.passes):
                for kernel, seen in times.items():
                    seen.append(time_compute(switch, kernel, rows, ids))
            dense, gather = np.median(times["dense"]), np.median(times["gather"])
            print(f"| {min(e, n)} | {r} | {dense * 1e3:.2f} | {gather * 1e3:.2f} | {dense / gather:.2f} |")


if __name__ == "__main__":
    main()
