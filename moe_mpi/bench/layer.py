"""``moe-mpi bench layer``: one MoE layer alone, split into router, experts, combine.

::

    mpirun -n 2 -x LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        -x OPENBLAS_NUM_THREADS=1 moe-mpi bench layer --synthetic dbrx-like --tokens 1,8,128

The first MoE block of the model gets a ``[1, T, hidden]`` random input (the
same on every rank). Per iteration, in every mode:

* **layer**: ``block(x)`` and ``mx.eval``, exactly as the model calls it. This
  is the honest number; the parts below add synchronisation points.
* **router**: the block's own code (gate, softmax, top-k) with its switch
  layer replaced by a probe that evaluates the routing and returns zeros.
* **experts**: the switch layer on the routed input, ``switch(x, inds)``:
  ``ep``: this rank's experts (incl. reading the routing back to numpy);
  ``mlx-lm-tp``: every expert's slice; ``single``: every expert;
  ``central``: rank 0's scatter, its own experts and the gather.
* **combine**: ``ep`` (and other SPMD moe_mpi modes): ``comm.all_sum`` of a
  ``[1, T, hidden]`` partial sum; ``mlx-lm-tp``: ``mx.distributed.all_sum``;
  ``central``: rank 0's send/receive time inside the switch call (which
  includes waiting for the owners' compute), taken out of its experts time.

In SPMD modes the ranks meet in an (untimed) barrier before every part, so a
part's time is that rank's own work: the slowest rank's experts time over the
mean is the measured load imbalance, and combine is the collective alone. In
``central`` rank 0 drives and the others serve (no barriers possible); a
worker's experts time is its busy time (wall minus time blocked in MPI) per
request. Each part is timed alone with ``time.perf_counter`` after
``--warmup`` untimed iterations; means over ``--iters``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..argtypes import int_list, non_negative_int, positive_int
from ..barrier import quiet_barrier
from ..runner import add_debug_argument, parse_args
from . import harness, report, routing
from .modes import Built, Context, tp_code_counts

__all__ = ["LayerParts", "layer_rows", "main", "setup_arg_parser"]

DEFAULT_TOKENS = [1, 8, 128]
DEFAULT_ITERS = 10
DEFAULT_WARMUP = 2

_P2P = ("send", "recv")


class _Probe(nn.Module):
    """Stands in for a switch layer: evaluates the routing, returns zeros."""

    def __init__(self, captured: list):
        super().__init__()
        # Bypass Module.__setattr__, which would file a list under the
        # module's children/parameters.
        object.__setattr__(self, "captured", captured)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mx.eval(x, indices)
        self.captured[:] = [x, indices]
        return mx.zeros((*indices.shape, x.shape[-1]), dtype=x.dtype)  # [..., k, D]


def _model_class(block: nn.Module) -> type:
    """The block's own (mlx-lm or adapter) class, under moe_mpi's mixins.

    moe_mpi swaps a block's class for one with a mixin in front (e.g. ``ep``'s
    all-reduce); the router pass must run the block's own ``__call__``.
    """
    for cls in type(block).__mro__:
        if "__call__" not in cls.__dict__:
            continue
        module = cls.__module__
        if module.startswith("moe_mpi.") and module != "moe_mpi.adapters":
            continue
        return cls
    raise TypeError(f"no __call__ found for {type(block).__name__}")


def _comm_seconds(counters: Dict[str, Dict[str, float]], kinds=None) -> float:
    return sum(v["seconds"] for k, v in counters.items() if kinds is None or k in kinds)


def _add(total: Optional[Dict[str, Dict[str, float]]], step: Dict[str, Dict[str, float]]):
    """Sum of two counter snapshots (``total`` None: ``step``)."""
    if total is None:
        return step
    return {k: {f: v + total[k][f] for f, v in fields.items()} for k, fields in step.items()}


class LayerParts:
    """The parts of one MoE block of a built model, each run and timed alone."""

    def __init__(self, ctx: Context, built: Built, model: nn.Module):
        from ..shard import find_moe_blocks

        self.ctx = ctx
        self.built = built
        moe = find_moe_blocks(model)[0]
        self.block, self.switch_name = moe.block, moe.switch_name
        self.switch = moe.switch
        self.base = _model_class(self.block)

    def router(self, x: mx.array) -> Tuple[float, mx.array, mx.array]:
        """``(seconds, switch input, expert indices)`` of the block's routing."""
        captured: list = []
        block = self.block
        setattr(block, self.switch_name, _Probe(captured))
        # mlx-lm's tensor-parallel block sums its output itself; not here.
        group = getattr(block, "sharding_group", None)
        if group is not None:
            block.sharding_group = None
        try:
            start = time.perf_counter()
            mx.eval(self.base.__call__(block, x))
            seconds = time.perf_counter() - start
        finally:
            setattr(block, self.switch_name, self.switch)
            if group is not None:
                block.sharding_group = group
        return seconds, captured[0], captured[1]

    def experts(self, x: mx.array, indices: mx.array) -> Tuple[float, mx.array]:
        """``(seconds, [..., k, D] output)`` of the switch layer."""
        start = time.perf_counter()
        y = self.switch(x, indices)
        mx.eval(y)
        return time.perf_counter() - start, y

    def combine(self, partial: mx.array) -> float:
        """Seconds of the mode's reduction of a ``[..., D]`` partial sum."""
        name = self.built.name
        if name == "single":
            return 0.0
        start = time.perf_counter()
        if name == "mlx-lm-tp":
            mx.eval(mx.distributed.all_sum(partial, group=self.ctx.group))
        else:
            self.ctx.comm.all_sum(partial)
        return time.perf_counter() - start

    def whole(self, x: mx.array) -> float:
        """Seconds of ``block(x)`` as the model calls it."""
        start = time.perf_counter()
        mx.eval(self.block(x))
        return time.perf_counter() - start


def _spmd_iterations(parts: LayerParts, x: mx.array, iters: int) -> Dict[str, Any]:
    """Every rank: barrier before each part; per-part times and counters."""
    ctx = parts.ctx
    times: Dict[str, List[float]] = {k: [] for k in ("router", "experts", "combine", "layer")}
    whole_counters = None
    pairs = None
    for _ in range(iters):
        quiet_barrier(ctx.ctl, idle=False)
        seconds, x_in, indices = parts.router(x)
        times["router"].append(seconds)
        quiet_barrier(ctx.ctl, idle=False)
        seconds, y = parts.experts(x_in, indices)
        times["experts"].append(seconds)
        partial = y.sum(axis=-2)  # [1, T, D]: the size the block reduces
        mx.eval(partial)
        quiet_barrier(ctx.ctl, idle=False)
        times["combine"].append(parts.combine(partial))
        quiet_barrier(ctx.ctl, idle=False)
        before = ctx.comm.snapshot()
        times["layer"].append(parts.whole(x))
        whole_counters = _add(whole_counters, harness.delta(ctx.comm.snapshot(), before))
        pairs = np.asarray(indices).reshape(-1)
    return {"times": times, "whole_counters": whole_counters, "indices": pairs}


def _central_iterations(parts: LayerParts, x: mx.array, iters: int) -> Dict[str, Any]:
    """Rank 0 only (the workers serve): per-part times, comm taken from counters."""
    comm = parts.ctx.comm
    times: Dict[str, List[float]] = {k: [] for k in ("router", "experts", "combine", "layer")}
    whole_counters = None
    pairs = None
    for _ in range(iters):
        seconds, x_in, indices = parts.router(x)
        times["router"].append(seconds)
        before = comm.snapshot()
        seconds, _ = parts.experts(x_in, indices)
        waited = _comm_seconds(harness.delta(comm.snapshot(), before), _P2P)
        times["experts"].append(seconds - waited)
        times["combine"].append(waited)
        before = comm.snapshot()
        times["layer"].append(parts.whole(x))
        whole_counters = _add(whole_counters, harness.delta(comm.snapshot(), before))
        pairs = np.asarray(indices).reshape(-1)
    return {"times": times, "whole_counters": whole_counters, "indices": pairs}


def _layer_one(ctx: Context, built: Built, tokens: int) -> Optional[Dict[str, Any]]:
    """Times one input size in one mode; the row on rank 0, None elsewhere."""
    args = ctx.args
    hidden = ctx.config["hidden_size"]
    x = mx.random.normal((1, tokens, hidden), key=mx.random.key(args.seed + tokens))  # [1, T, D]
    mx.eval(x)
    spmd = list(built.drivers) == list(range(ctx.size))
    loop = _spmd_iterations if spmd else _central_iterations
    state: Dict[str, Any] = {}

    def run(iters: int):
        def fn(model):
            if "parts" not in state:
                state["parts"] = LayerParts(ctx, built, model)
            return loop(state["parts"], x, iters)

        return fn

    if args.warmup:
        built.run(run(args.warmup))
    result, wall, counters = harness.timed_run(ctx, built, run(args.iters))
    state.clear()
    if result is None:
        # Not driving. A rank that exchanged messages served experts (a
        # central worker): its busy time per request, two requests (the
        # split's switch call and the whole block's) per iteration. A rank
        # without traffic only waited (single): no expert time.
        served = any(v["calls"] for v in counters.values())
        busy = (wall - _comm_seconds(counters)) / (2 * args.iters) if served else None
        result = {"times": None, "busy": busy}
    everyone = ctx.ctl.allgather(_summary(result, wall, counters))
    if ctx.rank != 0:
        return None
    return _row(ctx, built, tokens, result, everyone)


def _summary(result: Dict[str, Any], wall: float, counters) -> Dict[str, Any]:
    """This rank's msgpack-friendly means, for the gather."""
    out: Dict[str, Any] = {"wall": wall, "comm_seconds": _comm_seconds(counters)}
    if result.get("times"):
        out["means"] = {k: float(np.mean(v)) for k, v in result["times"].items()}
        whole = result["whole_counters"] or {}
        out["whole_comm_seconds"] = _comm_seconds(whole)
    else:
        out["means"] = {"experts": result["busy"]}
    return out


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def _row(ctx, built, tokens, result, everyone) -> Dict[str, Any]:
    args = ctx.args
    means = everyone[0]["means"]
    layer_s = means["layer"]
    # Ranks that computed experts (a single-process run's idle ranks did not).
    experts = [e["means"]["experts"] for e in everyone if e["means"]["experts"] is not None]
    row: Dict[str, Any] = {
        "mode": built.name,
        "tokens": tokens,
        "iters": args.iters,
        "layer_ms": layer_s * 1e3,
        "tokens_per_s": tokens / layer_s,
        "router_ms": means["router"] * 1e3,
        "experts_ms": means["experts"] * 1e3,
        "experts_ms_per_rank": [e * 1e3 for e in experts],
        "combine_ms": means["combine"] * 1e3,
        "combine_ms_per_rank": [_ms(e["means"].get("combine")) for e in everyone],
        "layer_ms_per_rank": [_ms(e["means"].get("layer")) for e in everyone],
        "counted": built.counted,
    }
    row["parts_ms"] = row["router_ms"] + row["experts_ms"] + row["combine_ms"]
    whole = result["whole_counters"] or {}
    if built.counted == "measured":
        calls = sum(v["calls"] for v in whole.values())
        row["collectives_per_call"] = calls / args.iters
        row["bytes_per_call"] = sum(v["bytes"] for v in whole.values()) / args.iters
        if all("whole_comm_seconds" in e for e in everyone):
            total = layer_s * args.iters
            row["comm_share"] = [e["whole_comm_seconds"] / total for e in everyone]
        else:  # central: rank 0 over the whole layer, workers over the window
            row["comm_share"] = [everyone[0]["whole_comm_seconds"] / (layer_s * args.iters)] + [
                e["comm_seconds"] / e["wall"] for e in everyone[1:]
            ]
    elif built.counted == "code":
        counts = tp_code_counts(ctx.config, tokens)
        # One of the two all-reduces per layer is the MoE block's.
        row["collectives_per_call"] = counts["calls_per_step"] / ctx.config["num_hidden_layers"] / 2
        row["bytes_per_call"] = counts["bytes_per_step"] / ctx.config["num_hidden_layers"] / 2
        row["comm_share"] = None
    else:
        row["collectives_per_call"] = row["bytes_per_call"] = 0
        row["comm_share"] = None
    if len(experts) > 1:
        row["imbalance"] = max(experts) / float(np.mean(experts)) if np.mean(experts) > 0 else None
    else:
        row["imbalance"] = None
    proxy = None
    layouts = routing.layouts_of(built.model)
    if layouts is not None and result.get("indices") is not None:
        proxy = routing.routing_imbalance([(0, np.asarray(result["indices"]))], layouts[:1], ctx.size)
    row["imbalance_pairs"] = proxy["per_layer"] if proxy else None
    row["pairs_per_rank"] = proxy["pairs_per_rank"] if proxy else None
    return row


def layer_rows(ctx: Context, built: Built) -> List[Dict[str, Any]]:
    """The workload: every ``--tokens`` size in mode ``built``; rows on rank 0."""
    rows = [_layer_one(ctx, built, t) for t in ctx.args.tokens]
    return [r for r in rows if r is not None]


def _ms_list(values: Optional[Sequence[float]]) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


COLUMNS = [
    ("mode", 10, lambda r: r["mode"]),
    ("T", 5, lambda r: str(r["tokens"])),
    ("layer ms", 9, lambda r: f"{r['layer_ms']:.3f}"),
    ("tok/s", 9, lambda r: f"{r['tokens_per_s']:.0f}"),
    ("router", 7, lambda r: f"{r['router_ms']:.3f}"),
    ("experts ms/rank", 16, lambda r: _ms_list(r["experts_ms_per_rank"])),
    ("combine", 8, lambda r: f"{r['combine_ms']:.3f}"),
    ("sum", 7, lambda r: f"{r['parts_ms']:.3f}"),
    ("coll", 5, lambda r: report.fmt(r["collectives_per_call"], ".3g") + ("*" if r["counted"] == "code" else "")),
    ("KiB", 7, lambda r: report.fmt(r["bytes_per_call"] / 1024, ".3g")),
    ("comm%", 7, lambda r: "/".join(f"{100 * s:.0f}" for s in r["comm_share"]) if r.get("comm_share") else "n/a"),
    ("imb(t)", 6, lambda r: report.fmt(r["imbalance"], ".2f")),
    ("imb(p)", 6, lambda r: report.fmt(r["imbalance_pairs"], ".2f")),
    ("peakMiB", 8, lambda r: report._mib_max(r.get("mlx_peak_bytes"))),
]

LEGEND = [
    "layer ms: block(x) + mx.eval as the model calls it (rank 0); tok/s = T / layer time",
    "router, experts, combine: the parts timed alone with barriers between them (SPMD "
    "modes), so 'sum' can exceed 'layer'; experts per rank; central: rank 0's own experts, "
    "workers' busy time per request, combine = rank 0's send/recv time incl. waiting",
    "coll, KiB: collectives (central: messages through rank 0) per layer call and their "
    "payload; * = mlx-lm-tp, from its code (1 MoE all_sum per block)",
    "comm%: Communicator seconds / layer time per rank (central workers: over the window)",
    "imb(t): slowest rank's experts time / mean (measured); imb(p): busiest rank's routed "
    "(token, slot) pairs / mean (from the placement)",
]


def _render(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["#", "# one MoE layer (the first), times in ms"]
    lines += report.format_table(COLUMNS, rows)
    lines += ["#"] + ["# " + line for line in LEGEND]
    return lines


def _plot(rows: List[Dict[str, Any]], filename: str, title: str) -> None:
    report.plot_bars(
        rows, "tokens", "layer_ms", filename, "one MoE layer " + title, "ms per layer call (log)", log=True
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench layer``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench layer",
        description="Time one MoE layer alone in every mode, split into router, expert "
        "compute and combine (all-reduce / scatter-gather). Run under mpirun: "
        "mpirun -n N moe-mpi bench layer ...",
    )
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--tokens",
        type=int_list,
        default=DEFAULT_TOKENS,
        help="comma-separated token counts T of the [1, T, hidden] input (default: 1,8,128)",
    )
    parser.add_argument(
        "--iters", type=positive_int, default=DEFAULT_ITERS,
        help=f"timed iterations per T (default: {DEFAULT_ITERS})",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
        help=f"untimed iterations first (default: {DEFAULT_WARMUP})",
    )
    add_debug_argument(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-mpi bench layer`` with ``argv`` (default: ``sys.argv[1:]``)."""
    args = parse_args(setup_arg_parser(), argv)
    method = [
        f"layer: first MoE block on a random [1, T, hidden] input, T in {args.tokens}; "
        f"{args.warmup} warm-up + {args.iters} timed iterations",
        "timing: each part timed alone (time.perf_counter), untimed barrier before each "
        "part in SPMD modes; the split adds syncs, so compare 'layer' across modes",
    ]
    return harness.run_benchmark(
        args,
        benchmark="layer",
        title="moe-mpi bench layer: one MoE layer per mode",
        workload=layer_rows,
        method_lines=method,
        render=_render,
        plot=_plot,
        config_record={"tokens": args.tokens, "iters": args.iters, "warmup": args.warmup},
    )
