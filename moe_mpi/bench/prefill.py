"""``moe-mpi bench prefill``: prompt-processing tokens/s, every mode side by side.

::

    mpirun -n 2 -x LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        -x OPENBLAS_NUM_THREADS=1 moe-mpi bench prefill --synthetic dbrx-like \\
        --lengths 128,256,512,1024

Method, per mode: one untimed warm-up prefill of the shortest prompt (it also
samples the routing for the load-imbalance proxy); then per prompt length L:
barrier, reset the communication counters, and ``--repeats`` timed prefills,
each into a fresh KV cache: ``model(prompt[None], cache)`` and ``mx.eval`` of
the last position's logits, timed alone with ``time.perf_counter`` on rank
0. The whole prompt goes through the model in one call (mlx-lm's default
``prefill_step_size`` of 2048 would too). The LM head runs on every position
in every mode alike (mlx-lm's ``__call__`` has no last-position-only path); at
vocab 8192 that is about 3% of dbrx-like's FLOPs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..argtypes import int_list, positive_int
from ..runner import add_debug_argument, parse_args
from . import harness, report, routing
from .decode import IMBALANCE_METHOD
from .modes import Built, Context, tp_code_counts

__all__ = ["main", "prefill", "prefill_rows", "setup_arg_parser"]

DEFAULT_LENGTHS = [128, 256, 512, 1024]
DEFAULT_REPEATS = 2

_IMBALANCE = IMBALANCE_METHOD.replace("the warm-up steps", "the warm-up prefill (shortest prompt)")


def prefill(model, tokens: np.ndarray) -> Tuple[mx.array, mx.array]:
    """Prefills ``tokens`` ``[1, L]`` into a fresh cache; the next token ``[1]``
    and the last position's logits ``[1, V]`` (evaluated)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(tokens), cache=cache)[:, -1, :]  # [1, V]
    token = mx.argmax(logits, axis=-1)  # [1]
    mx.eval(token, logits)
    return token, logits


def _tokens(ctx: Context, length: int) -> np.ndarray:
    """The ``[1, length]`` prompt of one length (the same on every rank)."""
    rng = np.random.default_rng(ctx.args.seed + length)
    return rng.integers(0, ctx.config["vocab_size"], (1, length), dtype=np.int32)


def _prefill_one(ctx: Context, built: Built, length: int, imbalance: Optional[tuple]) -> Optional[Dict[str, Any]]:
    """Times one prompt length in one mode; the row on rank 0, None elsewhere."""
    args = ctx.args
    tokens = _tokens(ctx, length)
    out: Dict[str, Any] = {}

    def timed(model) -> List[float]:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out["token"], out["logits"] = prefill(model, tokens)
            seconds.append(time.perf_counter() - start)
        return seconds

    seconds, wall, counters = harness.timed_run(ctx, built, timed)
    everyone = ctx.ctl.allgather({"wall": wall, "counters": counters})
    if ctx.rank != 0:
        return None
    row = report.throughput_row(
        built.name,
        built.counted,
        {"length": length},
        length,
        seconds,
        [e["wall"] for e in everyone],
        [e["counters"] for e in everyone],
        code_counts=tp_code_counts(ctx.config, length),
        imbalance=imbalance[0] if imbalance else None,
        imbalance_method=imbalance[1] if imbalance else "",
    )
    # What the last timed prefill produced: the next token and its logits.
    row["check"] = {"tokens": [np.array(out["token"]).tolist()], "logits": np.array(out["logits"].astype(mx.float32))}
    return row


def prefill_rows(ctx: Context, built: Built) -> List[Dict[str, Any]]:
    """The workload: every ``--lengths`` prompt in mode ``built``; rows on rank 0.

    One untimed warm-up prefill of the shortest prompt first; it also samples
    the routing for the load-imbalance proxy (so every length shows the same).
    """
    state: Dict[str, Any] = {}
    first = _tokens(ctx, min(ctx.args.lengths))

    def warm_up(model) -> None:
        with routing.record_routing(model if ctx.rank == 0 else None) as calls:
            prefill(model, first)
        if ctx.rank == 0:
            state["imbalance"] = routing.imbalance_for(built.name, model, calls, ctx.size)

    built.run(warm_up)
    imbalance = state.get("imbalance")
    rows = [_prefill_one(ctx, built, length, imbalance) for length in ctx.args.lengths]
    return [r for r in rows if r is not None]


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench prefill``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench prefill",
        description="Prefill (prompt processing) tokens/s of an MoE model in every mode, "
        "same model, same job. Run under mpirun: mpirun -n N moe-mpi bench prefill ...",
    )
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--lengths",
        type=int_list,
        default=DEFAULT_LENGTHS,
        help="comma-separated prompt lengths (default: 128,256,512,1024)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=DEFAULT_REPEATS,
        help=f"timed prefills per length, each into a fresh cache (default: {DEFAULT_REPEATS})",
    )
    add_debug_argument(parser)
    return parser


def _render(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["#", "# prefill"]
    lines += report.format_table(report.throughput_columns("length", "L"), rows)
    lines += ["#"] + ["# " + line for line in report.legend_lines(_IMBALANCE)]
    return lines


def _plot(rows: List[Dict[str, Any]], filename: str, title: str) -> None:
    report.plot_bars(
        rows, "length", "tokens_per_s", filename, "prefill " + title, "tokens/s"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-mpi bench prefill`` with ``argv`` (default: ``sys.argv[1:]``)."""
    args = parse_args(setup_arg_parser(), argv)
    method = [
        f"prefill: prompt lengths {args.lengths}; 1 warm-up prefill (shortest prompt) per "
        f"mode, then {args.repeats} timed prefills per length, each into a fresh KV cache, "
        "whole prompt in one model call",
        "timing: barrier, counters reset, barrier; each prefill (model call + mx.eval of "
        "the last position's argmax) timed alone with time.perf_counter on rank 0",
    ]
    return harness.run_benchmark(
        args,
        benchmark="prefill",
        title="moe-mpi bench prefill: prompt tokens/s per mode",
        workload=prefill_rows,
        method_lines=method,
        render=_render,
        plot=_plot,
        config_record={"lengths": args.lengths, "repeats": args.repeats},
        context_tokens=(max(args.lengths), "the longest of --lengths"),
    )
