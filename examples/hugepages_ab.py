"""Decode with the weights on 4 KiB pages against huge pages, in one process.

Loads the same checkpoint twice on every rank, with huge pages off
(``MOE_MPI_HUGE_PAGES=0`` for the loads), then moves the second copy's
weights into huge pages (:func:`moe_mpi.cpu.pages.collapse`) and times batch-1
decode steps of the two copies in turn, round after round: the comparison
that a drifting VM disturbs least, since both copies run within seconds of
each other in the same process::

    mpirun -n 2 .venv/bin/python examples/hugepages_ab.py [--synthetic dbrx-like] [--rounds 4] [--steps 24]

(as root add ``--allow-run-as-root``). Each rank holds its shard twice.
"""

import argparse
import os
import time

os.environ["MOE_MPI_HUGE_PAGES"] = "0"  # both copies load on 4 KiB pages; the second is collapsed below

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from moe_mpi import Communicator, load  # noqa: E402
from moe_mpi.cpu import pages  # noqa: E402
from moe_mpi.bench.shapes import ensure_synthetic  # noqa: E402

PROMPT = 32
WARMUP = 4


def step_ms(model, steps: int, comm) -> float:
    """Mean ms of ``steps`` batch-1 decode steps after a prompt and warm-up."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(1, PROMPT + 1)[None], cache=cache))
    token = mx.array([[1]])
    for i in range(WARMUP + steps):
        if i == WARMUP:
            comm.barrier()
            start = time.perf_counter()
        token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.eval(token)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", default="dbrx-like", help="synthetic model (as for moe-mpi bench)")
    parser.add_argument("--cache-dir", default=None, help="where synthetic checkpoints live (as for moe-mpi bench)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    comm = Communicator()
    path = ensure_synthetic(args.synthetic, comm, args.cache_dir, False)
    small, _ = load(path, comm=comm)
    huge, _ = load(path, comm=comm)
    weights = pages.large_weights(huge)
    start = time.perf_counter()
    collapsed = pages.collapse(weights)
    seconds = time.perf_counter() - start
    if comm.rank == 0:
        print(f"# {comm.size} ranks, {args.synthetic}, batch 1; rank 0 moved {collapsed >> 20} MiB "
              f"of {sum(a.nbytes for a in weights) >> 20} MiB of weights into huge pages in {seconds:.1f} s")
        print(f"{'round':>5} {'4K ms/step':>10} {'huge ms/step':>12} {'speed-up':>8}", flush=True)
    for r in range(args.rounds):
        a, b = step_ms(small, args.steps, comm), step_ms(huge, args.steps, comm)
        if comm.rank == 0:
            print(f"{r:>5} {a:>10.1f} {b:>12.1f} {a / b:>7.3f}x", flush=True)


if __name__ == "__main__":
    main()
