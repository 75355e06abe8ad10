"""The kernel ceiling of batch-1 expert-parallel decode (docs/benchmarks.md, targets 2 and 7).

How fast could ``ep`` decode at batch 1 go if MLX, Python dispatch and the
all-reduce cost nothing? This runs only the weight reads of a dbrx-like
decode step, on random weights of the same shapes:

* per layer: the attention projections and the router (replicated: every
  rank reads them), then this rank's share of 4 experts drawn uniformly out
  of 16 (contiguous placement, 8 per rank), then a barrier, which stands in
  for the all-reduce: the busier rank sets the pace, as in ``ep``;
* per step: the LM head.

It does so with each kernel in turn:

* ``gemv``: :func:`moe_mpi.cpu.gemv.matvec`, the compiled loop on ``[out, in]``
  weights (decode's default);
* ``sgemv``: numpy's OpenBLAS ``sgemv`` "N" on ``[in, out]`` weights (the
  expert path without the compiled loop);
* ``read``: no product at all, :func:`moe_mpi.cpu.gemv.read` of each weight
  (a bare sequential read, the fastest read loop found here): how fast
  this CPU reads the step's bytes, whatever a kernel does with them;
* ``layer``: the same bytes, but each layer's (dense weights and the
  chosen experts) stored in one buffer and read in one pass: the most
  favourable layout a step could have.

In the same job it measures the STREAM triad and the read-only pass of
``moe-mpi bench roofline`` (all ranks at once, before and after the
kernels) and prints each ceiling against the bandwidth limit that
``moe-mpi bench decode`` prints for ``ep`` (same byte model), at either
bandwidth::

    mpirun -n 2 .venv/bin/python examples/decode_ceiling.py [--kernels gemv,sgemv,read] [--synthetic dbrx-like]

(as root add ``--allow-run-as-root``). Each rank allocates ~1.7 GB per kernel.
"""

import argparse

import moe_mpi  # noqa: F401  (OpenBLAS for numpy and MLX, one thread per rank)
import numpy as np
from mpi4py import MPI

from moe_mpi.cpu import gemv
from moe_mpi.bench import roofline
from moe_mpi.bench.shapes import SYNTHETIC, synthetic_config

STEPS, WARMUP = 40, 5


def _read(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reads ``w`` once and does nothing else (:func:`moe_mpi.cpu.gemv.read`);
    returns zeros of the product's shape."""
    gemv.read(w)
    return np.zeros(w.shape[0], dtype=np.float32)


# name: (layout of each weight in memory, product of [out, in]-shaped w and x)
KERNELS = {
    "gemv": ("out_in", gemv.matvec),
    "sgemv": ("in_out", lambda w, x: w @ x),  # w: transposed view of [in, out] memory
    "read": ("out_in", _read),
    "layer": ("layer", None),  # one contiguous read per layer: see ceiling()
}


def ceiling(comm, config: dict, kernel: str) -> float:
    """Seconds per ep decode step with only the weight reads, slowest rank."""
    layout, mv = KERNELS[kernel]
    routing = np.random.default_rng(0)  # the same draws on every rank
    if layout == "layer":
        return _layer_ceiling(comm, config, routing)
    rank, size = comm.rank, comm.size
    d, f = config["hidden_size"], config["moe_intermediate_size"]
    e, k, layers = config["num_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    local = e // size
    rng = np.random.default_rng(rank)

    def weights(out: int, inp: int) -> np.ndarray:  # shape [out, in] either way
        if layout == "out_in":
            return rng.standard_normal((out, inp), dtype=np.float32)
        return np.ascontiguousarray(rng.standard_normal((inp, out), dtype=np.float32)).T

    experts = [[[weights(f, d), weights(f, d), weights(d, f)] for _ in range(local)] for _ in range(layers)]
    attention = [[weights(heads * hd, d), weights(kv * hd, d), weights(kv * hd, d), weights(d, heads * hd)]
                 for _ in range(layers)]
    routers = [weights(e, d) for _ in range(layers)]
    head = weights(config["vocab_size"], d)
    x = rng.standard_normal(d, dtype=np.float32)

    def step() -> None:
        for layer in range(layers):
            q = mv(attention[layer][0], x)
            for w in attention[layer][1:3]:
                mv(w, x)
            mv(attention[layer][3], q)
            mv(routers[layer], x)
            for expert in routing.permutation(e)[:k]:
                if expert // local == rank:
                    gate, up, down = experts[layer][expert % local]
                    g = mv(gate, x)
                    mv(down, g / (1 + np.exp(-np.clip(g, -30, 30))) * mv(up, x))
            comm.Barrier()  # the all-reduce: wait for the busier rank
        mv(head, x)

    return _timed(comm, step)


def _layer_ceiling(comm, config: dict, routing) -> float:
    """The ``layer`` kernel: the bytes of each layer in one buffer, read in one pass.

    The most favourable layout a step could have: per layer one
    :func:`moe_mpi.cpu.gemv.read` of the dense weights and this rank's chosen
    experts, stored next to each other (the first n local experts stand in
    for the n chosen: same bytes), then the barrier; the LM head at the end.
    Sizes from the limit's own byte model (:func:`roofline.model_bytes`).
    """
    rank, size = comm.rank, comm.size
    parts = roofline.model_bytes(config, itemsize=4)  # bytes of float32 weights
    e, k = parts["num_experts"], parts["top_k"]
    # model_bytes counts bytes as floats (quantized weights are fractional): whole floats here
    dense = int(parts["attention_per_layer"] + parts["router_per_layer"]) // 4
    expert = int(parts["expert"]) // 4
    local = e // size
    rng = np.random.default_rng(rank)
    buffers = [rng.standard_normal(dense + local * expert, dtype=np.float32) for _ in range(parts["layers"])]
    head = rng.standard_normal(int(parts["lm_head"]) // 4, dtype=np.float32)

    def step() -> None:
        for buffer in buffers:
            mine = sum(1 for expert_id in routing.permutation(e)[:k] if expert_id // local == rank)
            gemv.read(buffer[: dense + mine * expert])
            comm.Barrier()  # the all-reduce: wait for the busier rank
        gemv.read(head)

    return _timed(comm, step)


def _timed(comm, step) -> float:
    """Seconds per ``step()`` after warm-up, the slowest rank."""
    for _ in range(WARMUP):
        step()
    comm.Barrier()
    start = MPI.Wtime()
    for _ in range(STEPS):
        step()
    return comm.allreduce((MPI.Wtime() - start) / STEPS, op=MPI.MAX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated: gemv, sgemv, read, layer")
    parser.add_argument("--synthetic", default="dbrx-like", choices=list(SYNTHETIC), help="the shapes")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    comm = MPI.COMM_WORLD
    config = synthetic_config(args.synthetic)

    def probes() -> tuple:  # (triad, read-only) GB/s per rank, the slowest, all ranks at once
        return tuple(min(comm.allgather(p(_Comm(comm)))) for p in (roofline.stream_triad, roofline.stream_read))

    before = probes()
    seconds = {name: ceiling(comm, config, name) for name in kernels}
    after = probes()
    step_bytes = roofline.bytes_per_step(roofline.limit_parts(config), "ep", comm.size, 1)
    gbs = [(b + a) / 2 for b, a in zip(before, after)]
    limit, read_limit = (roofline.decode_limit(step_bytes, 1, g) for g in gbs)
    if comm.rank == 0:
        print(f"# {comm.size} ranks, {args.synthetic} shapes, weight reads only (no MLX, no all-reduce data); "
              f"matrix-vector: {gemv.describe()}")
        print(f"STREAM triad {before[0]:.1f} before, {after[0]:.1f} after -> {gbs[0]:.1f} GB/s per rank; "
              f"ep limit {limit:.1f} tok/s ({step_bytes / 1e6:.1f} MB/step, slowest rank)")
        print(f"read-only {before[1]:.1f} before, {after[1]:.1f} after -> {gbs[1]:.1f} GB/s per rank; "
              f"ep limit at that bandwidth {read_limit:.1f} tok/s")
        for name, s in seconds.items():
            print(f"{name:>6s} ceiling: {s * 1e3:5.1f} ms/step = {1 / s:5.1f} tok/s = "
                  f"{100 / s / limit:3.0f}% of the limit, {100 / s / read_limit:3.0f}% of the read-only one")


class _Comm:
    """The barrier :func:`moe_mpi.bench.roofline.stream_triad` needs."""

    def __init__(self, comm):
        self.comm = comm

    def barrier(self) -> None:
        self.comm.Barrier()


if __name__ == "__main__":
    main()
