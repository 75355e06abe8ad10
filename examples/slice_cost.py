"""Measure the fixed cost of computing one expert slice: the constant of balance.py's slice penalty.

Run with the ranks of the benchmarks, so that they share memory bandwidth as
they do in a run (rank 0 prints every rank's figures):

    mpirun -n 2 .venv/bin/python examples/slice_cost.py --synthetic dbrx-like-skewed

The optimizer's cost model (moe_mpi/balance.py, docs/balance.md) prices a
slice ``w`` columns wide of an expert's intermediate dimension like ``w + c``
columns of the whole expert, for the same rows: ``c``
(``balance.SLICE_OVERHEAD``, by rows) is the fixed cost of a slice. This script
measures ``c`` on the kernels a run uses. For each ``S`` of ``--splits``,
each rank loads the model with ``mode="sliced"`` as one rank of ``S``
(``S = 1``: every expert whole), so its experts are slices ``I / S`` wide,
read from the checkpoint as a run reads them. Then it times one switch
layer call on ``m`` rows for each of ``k`` experts:

* ``--rows`` through the decode step's kernel (``numpy_rows``, what
  ``moe_mpi.cpu.decode`` calls for batches up to 64);
* ``--prefill-rows`` through the prefill's (``compute``: one BLAS matmul
  per expert and projection).

A pass calls every expert of every MoE layer once, ``k`` per call, so the
weights come from memory, not the caches; each point is the median of
``--passes`` passes. Printed per kernel, rows and rank:

* ``S t(I/S) / t(I)`` for each ``S > 1`` at ``k`` = top-k (a decode step's
  call): what ``S`` slices cost against the whole expert, which the cost
  model puts at ``1 + c S / I``, and ``c (model)``, that ``c`` by least
  squares over ``S``: the constant itself, measured;
* a kernel fit over widths ``w`` and ``k`` (1 and top-k),
  ``t = A + k (a + b w)``: ``A`` a call's own cost (the same in every
  layout), ``a`` a slice's fixed cost, ``b`` one column's, ``c = a / b``;
* the whole expert's time against its rows, beside the cost model's
  ``1 + m / ROWS_PER_READ``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import moe_mpi  # noqa: F401  (loads OpenBLAS for MLX, one thread per rank)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from moe_mpi import Communicator
from moe_mpi.argtypes import int_list, positive_int
from moe_mpi.balance import ROWS_PER_READ, SLICE_OVERHEAD
from moe_mpi.bench.shapes import SYNTHETIC, ensure_synthetic
from moe_mpi.loading import load_model
from moe_mpi.memory import PlanningComm
from moe_mpi.shard import find_moe_blocks
from moe_mpi.slicing import slice_unit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local mlx-lm MoE model directory (float32 or quantized)")
    source.add_argument("--synthetic", choices=list(SYNTHETIC), default="dbrx-like-skewed")
    parser.add_argument("--cache-dir", help="where synthetic models are cached (default: bench's)")
    parser.add_argument("--splits", type=int_list, default=[1, 2, 4, 8], help="slices per expert (default 1,2,4,8)")
    parser.add_argument("--rows", type=int_list, default=[1, 2, 16], help="rows per expert, decode kernel")
    parser.add_argument("--prefill-rows", type=int_list, default=[128], help="rows per expert, prefill kernel")
    parser.add_argument("--passes", type=positive_int, default=5, help="passes per point, the median counts")
    return parser.parse_args()


def switches_of(path, rank: int, splits: int):
    """Each MoE layer's switch layer of ``rank``'s shard of ``splits`` ranks, mode sliced."""
    model, _ = load_model(path, PlanningComm(rank % splits, splits), mode="sliced", progress=False)
    return model, list(model.ep_info.switches)


def time_pass(comm, switches, hidden: int, rows: int, k: int, prefill: bool, rng) -> float:
    """Seconds per call of one pass: every expert of every layer once, ``k`` per call."""
    n = switches[0].expert_shard.num_experts
    calls = []
    for switch in switches:
        for first in range(0, n - n % k, k):
            calls.append((switch, np.repeat(np.arange(first, first + k), rows)))
    x = rng.standard_normal((k * rows, hidden), dtype=np.float32)
    xm = mx.array(x)
    mx.eval(xm)
    comm.barrier()  # every rank works at once, as in a run
    start = time.perf_counter()
    for switch, ids in calls:
        if prefill:
            mx.eval(switch.compute(xm, ids))
        else:
            switch.numpy_rows(x, ids)
    return (time.perf_counter() - start) / len(calls)


def fit(points: List[Tuple[int, int, float]]) -> Dict[str, float]:
    """Least squares ``t = A + k a + k w b`` over ``(w, k, t)``; ``c = a / b`` and its standard error."""
    w = np.array([p[0] for p in points], dtype=np.float64)
    k = np.array([p[1] for p in points], dtype=np.float64)
    t = np.array([p[2] for p in points], dtype=np.float64)
    X = np.stack([np.ones_like(w), k, k * w], axis=1)
    coef, *_ = np.linalg.lstsq(X, t, rcond=None)
    resid = t - X @ coef
    dof = max(len(t) - 3, 1)
    cov = np.linalg.inv(X.T @ X) * float(resid @ resid) / dof
    A, a, b = coef
    # c = a / b: first-order error propagation with the fit's covariance.
    grad = np.array([0.0, 1.0 / b, -a / b**2])
    return dict(A=A, a=a, b=b, c=a / b, c_err=float(np.sqrt(grad @ cov @ grad)),
                rms=float(np.sqrt(np.mean(resid**2))))


def main() -> None:
    args = parse_args()
    comm = Communicator()
    path = Path(args.model) if args.model else ensure_synthetic(args.synthetic, comm, args.cache_dir, False)
    rng = np.random.default_rng(comm.rank)
    # Quantized experts have no numpy decode step: every batch runs the switch layer's ``compute``.
    quantized = "quantization" in json.loads((Path(path) / "config.json").read_text())
    if quantized:
        kernels = [(m, True) for m in sorted(set(args.rows) | set(args.prefill_rows))]
    else:
        kernels = [(m, False) for m in args.rows] + [(m, True) for m in args.prefill_rows]
    times: Dict[Tuple[int, bool, int, int], float] = {}  # (m, prefill, width, k) -> seconds per call
    inter = top_k = None
    huge: Dict[int, float] = {}  # width -> huge-page bytes over expert bytes
    for splits in args.splits:
        model, switches = switches_of(path, comm.rank, splits)
        top_k, hidden = _top_k(model), model.args.hidden_size
        width = slice_unit(switches[0])[0]  # this shard's slice of the intermediate dimension
        inter = inter or width * splits
        # Decode at one row is memory-bound: whether the weights sit on huge pages shows in its time.
        expert_bytes = sum(a.nbytes for s in switches for _, a in tree_flatten(s.parameters()))
        huge[width] = getattr(getattr(model, "cpu_path", None), "huge_page_bytes", 0) / expert_bytes
        for m, prefill in kernels:
            for k in sorted({1, top_k}):
                per_call = [time_pass(comm, switches, hidden, m, k, prefill, rng) for _ in range(args.passes)]
                times[m, prefill, width, k] = statistics.median(per_call)
        del model, switches
        mx.clear_cache()
    # The control allgather sends plain lists (msgpack: no tuple keys).
    every = [{tuple(row[:4]): row[4] for row in rank_rows}
             for rank_rows in comm.allgather([[*key, t] for key, t in times.items()])]
    huge_every = comm.allgather([[w, f] for w, f in huge.items()])
    if comm.rank:
        return
    print(f"# model {path}: expert intermediate size I = {inter}, top-k {top_k}; {comm.size} ranks at once")
    if quantized:
        print("# quantized: every row count through the switch layer's compute (MLX's quantized kernels), "
              "as decode and prefill run it; 'prefill' below names that kernel")
    print(f"# balance.SLICE_OVERHEAD now {SLICE_OVERHEAD} (rows, c), ROWS_PER_READ {ROWS_PER_READ:g}; "
          f"widths {sorted({w for (_, _, w, _) in times})}")
    print("# weights in huge pages (MADV_COLLAPSE, all weights over expert bytes), per width: "
          + "; ".join(f"rank {r}: " + " ".join(f"{w}: {f:.0%}" for w, f in sorted(h)) for r, h in enumerate(huge_every)))
    splits = sorted(inter // w for w in {w for (_, _, w, _) in times} if w < inter)
    print("# S*t(I/S)/t(I): S slices against the whole expert, k = top-k experts per call; the cost model puts it")
    print("# at 1 + c S / I. c (model): that c, least squares over S; kernel fit: t = A + k (a + b w), c = a / b.")
    print(f"{'kernel':>8} {'rows':>5} {'rank':>4} " + " ".join(f"{'S=' + str(n):>6}" for n in splits)
          + f" {'c(model)':>9} {'+-':>6} | {'A us':>7} {'a us':>7} {'b ns/col':>8} {'c':>7} {'+-':>6}")
    for m, prefill in kernels:
        for rank, rank_times in enumerate(every):
            whole = rank_times[m, prefill, inter, top_k]
            ratios = [n * rank_times[m, prefill, inter // n, top_k] / whole for n in splits]
            c, c_err = slice_constant(splits, ratios, inter)
            f = fit([(w, k, t) for (mm, pp, w, k), t in rank_times.items() if (mm, pp) == (m, prefill)])
            print(f"{'prefill' if prefill else 'decode':>8} {m:5d} {rank:4d} " + " ".join(f"{r:6.3f}" for r in ratios)
                  + f" {c:9.1f} {c_err:6.1f} | {f['A'] * 1e6:7.1f} {f['a'] * 1e6:7.1f} {f['b'] * 1e9:8.1f}"
                  f" {f['c']:7.1f} {f['c_err']:6.1f}")
    print(f"# whole expert against its rows, k = top-k: t(m) / t({kernels[0][0]}) measured; the cost model's"
          f" (1 + m/{ROWS_PER_READ:g}) / (1 + {kernels[0][0]}/{ROWS_PER_READ:g})")
    for m, prefill in kernels:
        base = [t[kernels[0][0], kernels[0][1], inter, top_k] for t in every]
        measured = " ".join(f"{t[m, prefill, inter, top_k] / b:7.2f}" for t, b in zip(every, base))
        model = (1 + m / ROWS_PER_READ) / (1 + kernels[0][0] / ROWS_PER_READ)
        print(f"#   {'prefill' if prefill else 'decode'} rows {m}: ranks {measured}; model {model:.2f}")
    print("# per point (seconds per call, median of passes): kernel rows width k -> rank 0, rank 1, ...")
    for key in sorted(every[0]):
        m, prefill, w, k = key
        print(f"#   {'prefill' if prefill else 'decode'} {m} {w} {k}: " + " ".join(f"{t[key] * 1e6:.1f}us" for t in every))


def slice_constant(splits: List[int], ratios: List[float], inter: int) -> Tuple[float, float]:
    """The cost model's ``c`` from ``S t(I/S) / t(I) = 1 + c S / I``: least squares through the origin
    over the splits, and its standard error (0 with one split)."""
    x = np.array(splits, dtype=np.float64) / inter
    y = np.array(ratios, dtype=np.float64) - 1.0
    c = float(x @ y / (x @ x))
    err = float(np.sqrt(np.sum((y - c * x) ** 2) / (len(x) - 1) / (x @ x))) if len(x) > 1 else 0.0
    return c, err


def _top_k(model) -> int:
    """Experts per token of the model's first MoE block."""
    block = find_moe_blocks(model)[0].block
    for name in ("num_experts_per_tok", "top_k", "moe_top_k"):
        if isinstance(getattr(block, name, None), int):
            return getattr(block, name)
    return 2


if __name__ == "__main__":
    main()
