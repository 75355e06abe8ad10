"""The kernel ceiling of batch-1 expert-parallel decode (docs/benchmarks.md, target 2).

How fast could ``ep`` decode at batch 1 go if MLX, Python dispatch and the
all-reduce cost nothing? This runs only the weight reads of a dbrx-like
decode step, with the kernels moe_mpi uses (numpy's OpenBLAS ``sgemv`` on
``[in, out]`` weights), on random weights of the same shapes:

* per layer: the attention projections and the router (replicated: every
  rank reads them), then this rank's share of 4 experts drawn uniformly out
  of 16 (contiguous placement, 8 per rank), then a barrier, which stands in
  for the all-reduce: the busier rank sets the pace, as in ``ep``;
* per step: the LM head.

In the same job it measures the STREAM triad of ``moe-mpi bench roofline``
(all ranks at once) and prints the ceiling beside the bandwidth limit that
``moe-mpi bench decode`` prints for ``ep`` (same byte model)::

    mpirun -n 2 .venv/bin/python examples/decode_ceiling.py

(as root add ``--allow-run-as-root``). Each rank allocates ~1.7 GB.
"""

import time

import moe_mpi  # noqa: F401  (OpenBLAS for numpy and MLX, one thread per rank)
import numpy as np
from mpi4py import MPI

from moe_mpi.bench import roofline
from moe_mpi.bench.models import synthetic_config

STEPS, WARMUP = 40, 5


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    config = synthetic_config("dbrx-like")
    d, f = config["hidden_size"], config["moe_intermediate_size"]
    e, k, layers = config["num_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    local = e // size
    rng = np.random.default_rng(rank)

    def weights(*shape):
        # [in, out] in memory, read as the transposed view: sgemv "N", as moe_mpi does.
        return np.ascontiguousarray(rng.standard_normal(shape[::-1], dtype=np.float32)).T

    experts = [[[weights(f, d), weights(f, d), weights(d, f)] for _ in range(local)] for _ in range(layers)]
    attention = [[weights(heads * hd, d), weights(kv * hd, d), weights(kv * hd, d), weights(d, heads * hd)]
                 for _ in range(layers)]
    routers = [weights(e, d) for _ in range(layers)]
    head = weights(config["vocab_size"], d)
    x = rng.standard_normal(d, dtype=np.float32)
    routing = np.random.default_rng(0)  # the same draws on every rank

    def step() -> None:
        for layer in range(layers):
            q = attention[layer][0] @ x
            for w in attention[layer][1:3]:
                w @ x
            attention[layer][3] @ q
            routers[layer] @ x
            for expert in routing.permutation(e)[:k]:
                if expert // local == rank:
                    gate, up, down = experts[layer][expert % local]
                    g = gate @ x
                    down @ (g / (1 + np.exp(-np.clip(g, -30, 30))) * (up @ x))
            comm.Barrier()  # the all-reduce: wait for the busier rank
        head @ x

    for _ in range(WARMUP):
        step()
    comm.Barrier()
    start = MPI.Wtime()
    for _ in range(STEPS):
        step()
    seconds = (MPI.Wtime() - start) / STEPS
    seconds = comm.allreduce(seconds, op=MPI.MAX)
    gbs = min(comm.allgather(roofline.stream_triad(_Comm(comm))))
    parts = roofline.limit_parts(config)
    limit = roofline.decode_limit(roofline.bytes_per_step(parts, "ep", size, 1), 1, gbs)
    if rank == 0:
        print(f"# {size} ranks, dbrx-like shapes, numpy sgemv only (no MLX, no all-reduce data)")
        print(f"kernel ceiling: {seconds * 1e3:.1f} ms/step = {1 / seconds:.1f} tok/s")
        print(f"STREAM triad {gbs:.1f} GB/s per rank -> ep limit {limit:.1f} tok/s; "
              f"ceiling = {100 / seconds / limit:.0f}% of the limit")


class _Comm:
    """The barrier :func:`moe_mpi.bench.roofline.stream_triad` needs."""

    def __init__(self, comm):
        self.comm = comm

    def barrier(self) -> None:
        self.comm.Barrier()


if __name__ == "__main__":
    main()
