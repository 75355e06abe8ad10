"""``moe-mpi bench decode``: decode tokens/s of an MoE model, every mode side by side.

Every mode runs the same model in one ``mpirun`` job, one after another::

    mpirun -n 2 moe-mpi bench decode --synthetic dbrx-like --batch 1,8

(as root add ``--allow-run-as-root``; more ranks than cores need
``--oversubscribe``). Modes: ``ep``, ``sliced`` and ``central``
(:func:`moe_mpi.load`), ``mlx-lm-tp`` (mlx-lm's ``model.shard``) and
``single`` (plain mlx-lm on rank 0); see :mod:`moe_mpi.bench.modes`.

Method, per mode and batch size B: prefill a ``--prompt-tokens`` prompt per
sequence into a fresh KV cache (``make_prompt_cache``), run ``--warmup``
decode steps (untimed; they also sample the routing for the load-imbalance
proxy), then barrier, reset the communication counters, and time
``--steps`` steps. A step feeds the ``[B, 1]`` argmax tokens back (the same
on every rank) and ends in ``mx.eval``; each is timed alone with
``time.perf_counter`` on rank 0. B > 1 is B independent sequences decoded
together. The greedy tokens of every step and the last step's logits are
checked against the same run on single-process mlx-lm
(:mod:`moe_mpi.bench.verify`), and the row counts the steps that ran the
numpy decode step (:mod:`moe_mpi.cpu.decode`) and those that ran mlx-lm's code.

Right before and right after the timed steps a STREAM triad runs on the
ranks that drive the mode (:mod:`moe_mpi.bench.roofline`), and the row gets
the bandwidth limit on tokens/s that the mean of the two implies
(``--no-roofline`` skips it).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..argtypes import int_list, non_negative_int, positive_int
from ..runner import add_debug_argument, parse_args
from . import harness, report, roofline, routing
from .modes import Built, Context, tp_code_counts

__all__ = ["decode_rows", "main", "setup_arg_parser"]

DEFAULT_STEPS = 32
DEFAULT_WARMUP = 8
DEFAULT_PROMPT_TOKENS = 32

IMBALANCE_METHOD = (
    "routing proxy: busiest rank's routed (token, slot) pairs over the mean rank's, "
    "per MoE layer call, averaged over the warm-up steps (each layer's all-reduce "
    "waits for the busiest rank); 1.00 = balanced; mlx-lm-tp is 1.00 by construction"
)


def step(model, cache, tokens: mx.array) -> Tuple[mx.array, mx.array]:
    """One decode step: ``[B]`` tokens in; the ``[B]`` argmax tokens and ``[B, V]`` logits out (evaluated)."""
    logits = model(tokens[:, None], cache=cache)[:, -1, :]  # [B, V]
    tokens = mx.argmax(logits, axis=-1)  # [B]
    mx.eval(tokens, logits)
    return tokens, logits


def _numpy_steps(model) -> int:
    path = getattr(model, "cpu_path", None)
    return path.numpy_steps if path is not None else 0


def _decode_one(ctx: Context, built: Built, batch: int) -> Optional[Dict[str, Any]]:
    """Times one batch size in one mode; the row on rank 0, None elsewhere."""
    from mlx_lm.models.cache import make_prompt_cache

    args = ctx.args
    rng = np.random.default_rng(args.seed + batch)
    prompts = rng.integers(
        0, ctx.config["vocab_size"], (batch, args.prompt_tokens), dtype=np.int32
    )
    state: Dict[str, Any] = {}

    def setup(model) -> None:
        cache = make_prompt_cache(model)
        logits = model(mx.array(prompts), cache=cache)  # [B, P, V]
        tokens = mx.argmax(logits[:, -1, :], axis=-1)  # [B]
        mx.eval(tokens)
        produced = [tokens]
        with routing.record_routing(model if ctx.rank == 0 else None) as calls:
            for _ in range(args.warmup):
                tokens, _ = step(model, cache, tokens)
                produced.append(tokens)
        state.update(cache=cache, tokens=tokens, produced=produced)
        if ctx.rank == 0:
            state["imbalance"] = routing.imbalance_for(built.name, model, calls, ctx.size)

    def timed(model) -> List[float]:
        cache, tokens, produced = state["cache"], state["tokens"], state["produced"]
        numpy_before = _numpy_steps(model)
        seconds = []
        logits = None
        for _ in range(args.steps):
            start = time.perf_counter()
            tokens, logits = step(model, cache, tokens)
            seconds.append(time.perf_counter() - start)
            produced.append(tokens)
        state["numpy_steps"] = _numpy_steps(model) - numpy_before
        state["last_logits"] = logits
        return seconds

    built.run(setup)
    # The bandwidth the weights are read at, measured in this job right
    # before and right after the timed steps (this drifts: a VM's bandwidth
    # can change within seconds), with the ranks that drive this mode reading
    # together (`single`: rank 0 alone).
    probes = args.roofline and not ctx.reference_run
    before = _stream_gbs(ctx, built) if probes else None
    seconds, wall, counters = harness.timed_run(ctx, built, timed)
    after = _stream_gbs(ctx, built) if probes else None
    everyone = ctx.ctl.allgather({"wall": wall, "counters": counters})
    imbalance, method = state.get("imbalance", (None, ""))
    check = None
    if ctx.rank == 0:
        # What the timed run produced: every step's greedy tokens, the last logits.
        check = {
            "tokens": np.stack([np.array(t) for t in state["produced"]]).tolist(),  # [steps, B]
            "logits": np.array(state["last_logits"].astype(mx.float32)),  # [B, V]
        }
        numpy_steps = state["numpy_steps"]
    state.clear()  # the KV cache
    if ctx.rank != 0:
        return None
    row = report.throughput_row(
        built.name,
        built.counted,
        {"batch": batch},
        batch,
        seconds,
        [e["wall"] for e in everyone],
        [e["counters"] for e in everyone],
        code_counts=tp_code_counts(ctx.config, batch),
        imbalance=imbalance,
        imbalance_method=method,
    )
    row["check"] = check
    # Which code ran each timed step: the numpy decode step, or the model's own.
    row["decode_path"] = {"numpy_steps": numpy_steps, "model_code_steps": len(seconds) - numpy_steps}
    parts = roofline.limit_parts(ctx.config)
    if before is not None and parts is not None:
        gbs = (before[0] + after[0]) / 2  # the window's bandwidth, as well as two samples tell
        read_gbs = (before[1] + after[1]) / 2
        # What this mode's model holds where: auto's layouts are its own, not ep's.
        layouts = getattr(getattr(built.model, "ep_info", None), "layouts", None)
        step_bytes = roofline.bytes_per_step(parts, built.name, ctx.size, batch, layouts)
        limit = roofline.decode_limit(step_bytes, batch, gbs)
        read_limit = roofline.decode_limit(step_bytes, batch, read_gbs)
        row.update(
            stream_gbs=gbs,
            stream_gbs_before=before[0],
            stream_gbs_after=after[0],
            weight_bytes_per_step=step_bytes,
            limit_tokens_per_s=limit,
            of_limit=row["tokens_per_s"] / limit,
            read_gbs=read_gbs,
            read_gbs_before=before[1],
            read_gbs_after=after[1],
            read_limit_tokens_per_s=read_limit,
            of_read_limit=row["tokens_per_s"] / read_limit,
        )
    return row


def _stream_gbs(ctx: Context, built: Built) -> Tuple[float, float]:
    """GB/s per rank (the slowest) of the STREAM triad and of a read-only
    pass (:func:`moe_mpi.bench.roofline.stream_read`), as this mode reads memory."""
    mbytes = ctx.args.stream_mb
    with harness.exclude_from_peak_rss(ctx):  # the probes' arrays are not the mode's
        if len(built.drivers) == 1 and ctx.size > 1:  # `single`: the others sleep
            return tuple(roofline.probe_alone(ctx.ctl, p, mbytes) for p in (roofline.stream_triad, roofline.stream_read))
        return tuple(min(ctx.ctl.allgather(p(ctx.ctl, mbytes))) for p in (roofline.stream_triad, roofline.stream_read))


def decode_rows(ctx: Context, built: Built) -> List[Dict[str, Any]]:
    """The workload: every ``--batch`` size in mode ``built``; rows on rank 0."""
    rows = [_decode_one(ctx, built, batch) for batch in ctx.args.batch]
    return [r for r in rows if r is not None]


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench decode``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench decode",
        description="Decode tokens/s of an MoE model in every mode (expert parallel, "
        "central router, mlx-lm tensor parallel, single process), same model, same "
        "job. Run under mpirun: mpirun -n N moe-mpi bench decode ...",
    )
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--batch",
        type=int_list,
        default=[1, 8],
        help="comma-separated batch sizes: B sequences decoded together (default: 1,8)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help=f"timed decode steps (default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=DEFAULT_WARMUP,
        help=f"untimed decode steps first (default: {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=DEFAULT_PROMPT_TOKENS,
        help=f"prompt length prefilled before decoding (default: {DEFAULT_PROMPT_TOKENS})",
    )
    parser.add_argument(
        "--roofline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure memory bandwidth (STREAM triad) before each mode's timed steps and "
        "print each row's bandwidth limit beside it (default: on)",
    )
    parser.add_argument(
        "--stream-mb",
        type=positive_int,
        default=roofline.STREAM_MB,
        help=f"STREAM triad arrays, MB per rank in all (default: {roofline.STREAM_MB})",
    )
    add_debug_argument(parser)
    return parser


def _render(rows: List[Dict[str, Any]]) -> List[str]:
    lines = ["#", "# decode"]
    roofline_rows = any("limit_tokens_per_s" in r for r in rows)
    columns = report.throughput_columns("batch", "B")
    if roofline_rows:
        columns += ROOFLINE_COLUMNS
    lines += report.format_table(columns, rows)
    lines += ["#"] + ["# " + line for line in report.legend_lines(IMBALANCE_METHOD)]
    if roofline_rows:
        lines.append("# " + ROOFLINE_LEGEND)
    return lines


def _before_after(row: Dict[str, Any]) -> str:
    if row.get("stream_gbs_before") is None:
        return "n/a"
    return f"{row['stream_gbs_before']:.1f}/{row['stream_gbs_after']:.1f}"


ROOFLINE_COLUMNS = [
    ("GB/s", 6, lambda r: report.fmt(r.get("stream_gbs"), ".1f")),
    ("before/after", 12, _before_after),
    ("MB/step", 8, lambda r: report.fmt(r.get("weight_bytes_per_step") and r["weight_bytes_per_step"] / 1e6, ".4g")),
    ("limit", 7, lambda r: report.fmt(r.get("limit_tokens_per_s"), ".1f")),
    ("%limit", 7, lambda r: report.fmt(r.get("of_limit") and 100 * r["of_limit"], ".0f")),
    ("readGB/s", 8, lambda r: report.fmt(r.get("read_gbs"), ".1f")),
    ("%read", 6, lambda r: report.fmt(r.get("of_read_limit") and 100 * r["of_read_limit"], ".0f")),
]
ROOFLINE_LEGEND = (
    "roofline: GB/s = mean of a STREAM triad per rank measured right before and right after "
    "the mode's timed steps (before/after: the two; slowest rank, all driving ranks reading "
    "at once; single: rank 0 alone); MB/step = "
    "weight bytes the slowest rank reads per step (moe_mpi.bench.roofline, uniform "
    "routing, on the experts' places in the mode's model: auto's layouts are its own); "
    "limit = GB/s / MB/step x B tokens/s; %limit = tok/s / limit; readGB/s = the same "
    "for a read-only pass (moe_mpi.cpu.gemv.read, BLAS sdot or moe_mpi.cpu.gemv.matvec, the fastest: decode only reads weights), "
    "%read = tok/s / (readGB/s / MB/step x B)"
)


def _plot(rows: List[Dict[str, Any]], filename: str, title: str) -> None:
    report.plot_bars(
        rows, "batch", "tokens_per_s", filename, "decode " + title, "tokens/s"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``moe-mpi bench decode`` with ``argv`` (default: ``sys.argv[1:]``)."""
    args = parse_args(setup_arg_parser(), argv)
    method = [
        f"decode: prompt {args.prompt_tokens} tokens per sequence, {args.warmup} warm-up steps, "
        f"{args.steps} timed steps per batch size; batch sizes {args.batch}",
        "timing: barrier, counters reset, barrier; each step (model call + argmax + mx.eval) "
        "timed alone with time.perf_counter on rank 0",
    ]
    return harness.run_benchmark(
        args,
        benchmark="decode",
        title="moe-mpi bench decode: decode tokens/s per mode",
        workload=decode_rows,
        method_lines=method,
        render=_render,
        plot=_plot,
        config_record={
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "prompt_tokens": args.prompt_tokens,
        },
        context_tokens=(
            args.prompt_tokens + args.warmup + args.steps, "a sequence of --prompt-tokens + --warmup + --steps"
        ),
    )
