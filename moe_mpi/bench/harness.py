"""The loop every model benchmark shares: build each mode, check it, run the workload, report.

``moe-mpi bench decode | prefill | layer`` each give :func:`run_benchmark`
a workload (``workload(ctx, built) -> rows``). For every mode in turn it
builds the model, checks one forward pass against single-process mlx-lm,
runs the workload, checks the rows' outputs against the same workload on
single-process mlx-lm (:mod:`.verify`), records memory and frees the model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..barrier import quiet_barrier
from ..cpu import switches
from ..argtypes import add_balance_arguments, positive_int, seed
from ..runner import collective_phase
from . import report, ties, verify
from .modes import Built, Context, SingleProcess, default_modes, get_mode, mode_description, mode_names, modes_arg
from .shapes import SYNTHETIC, default_cache_dir, describe_model, ensure_synthetic

__all__ = ["add_common_arguments", "delta", "exclude_from_peak_rss", "run_benchmark", "run_modes", "timed_run"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, modes and output options shared by decode, prefill and layer."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", metavar="PATH", help="local mlx-lm MoE model directory"
    )
    source.add_argument(
        "--synthetic",
        metavar="NAME",
        choices=list(SYNTHETIC),
        help=f"random-weight qwen3_moe model of a named shape: {', '.join(SYNTHETIC)} "
        "(default: dbrx-like)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"where synthetic models are written once (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--modes",
        type=modes_arg,
        default=None,
        help=f"comma-separated modes, run one after another on the same model "
        f"(default: {','.join(default_modes())}; also: {','.join(n for n in mode_names() if n not in default_modes())})",
    )
    parser.add_argument(
        "--backend",
        choices=("mpi4py", "mlx"),
        default="mpi4py",
        help="data path of moe_mpi's all-reduce (Communicator backend; default mpi4py)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the token ids")
    parser.add_argument(
        "--stats", metavar="FILE", default=None,
        help="router statistics (moe-mpi profile) for mode auto (uniform routing without)",
    )
    add_balance_arguments(parser)
    parser.add_argument(
        "--tp-cpu-path",
        action="store_true",
        help="give the mlx-lm-tp baseline moe_mpi's CPU speed path (numpy one-row products, "
        "norms and RoPE, the CPU expert kernels, huge pages, and the numpy decode step with "
        "mlx-lm's own all-reduces; moe_mpi.cpu.tensor_parallel), so that it runs with the "
        "same kernels as moe_mpi's modes",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run the whole sequence of modes this many times in the job and report, "
        "per mode, the round with the median tok/s (a slow spell of a shared machine "
        "then cannot fall on one mode only; default 1)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write machine info, command and rows as JSON"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="bar chart of the results (needs matplotlib)"
    )


def delta(after: Dict[str, Dict[str, float]], before: Dict[str, Dict[str, float]]):
    """Counter difference of two :meth:`Communicator.snapshot` results."""
    return {
        kind: {f: after[kind][f] - before.get(kind, {}).get(f, 0) for f in after[kind]}
        for kind in after
    }


@contextlib.contextmanager
def exclude_from_peak_rss(ctx: Context) -> Iterator[None]:
    """The memory a benchmark's own probe allocates (the STREAM arrays) does
    not count in the mode's peak RSS: the peak so far is kept in
    ``ctx.rss_floor_bytes`` and VmHWM is reset after the probe frees it."""
    peak = report.memory_info()["peak_rss_bytes"] or 0
    ctx.rss_floor_bytes = max(ctx.rss_floor_bytes, peak)
    try:
        yield
    finally:
        report.reset_peak_rss()


def timed_run(ctx: Context, built: Built, fn: Callable[[nn.Module], Any]):
    """Runs ``fn`` in ``built`` with the counters reset; per-rank wall time.

    Every rank: barrier, reset the model's counters, barrier, run, stop the
    clock. The ranks that only serve (``central`` workers) or wait
    (``single``) are timed over the same window, so their communication share
    is over the same step time.

    Returns:
        ``(result, wall_seconds, counters)``: ``fn``'s result on driving
        ranks (None elsewhere), this rank's wall time, and its counter
        snapshot for the run.
    """
    quiet_barrier(ctx.ctl, idle=False)
    ctx.comm.reset_stats()
    quiet_barrier(ctx.ctl, idle=False)
    start = time.perf_counter()
    result = built.run(fn)
    wall = time.perf_counter() - start
    return result, wall, ctx.comm.snapshot()


#: The exactness guard's prompt length (tokens).
GUARD_TOKENS = 16


def _release() -> None:
    """Returns freed arrays' memory: call after dropping the last reference."""
    gc.collect()
    mx.clear_cache()


def _row_key(row: Dict[str, Any]) -> tuple:
    """A row's workload parameters (batch, length, tokens), without the mode."""
    return tuple((k, row[k]) for k in ("batch", "length", "tokens") if k in row)


def _reference(ctx: Context, workload, tokens, emit) -> Dict[str, Any]:
    """Plain mlx-lm's guard logits and workload outputs (rank 0), for modes to be checked against."""
    reference: Dict[str, Any] = {}
    start = time.perf_counter()
    built = None
    with collective_phase(ctx.ctl, debug=ctx.args.debug):
        built = SingleProcess().build(ctx)
    guard = built.run(lambda m: verify.guard_logits(m, tokens))
    ctx.reference_run = True
    try:
        with ties.watch_top_k() as gaps:  # untimed: it reads every router's scores back
            rows = workload(ctx, built)
    finally:
        ctx.reference_run = False
    if ctx.rank == 0:
        reference = {"guard": guard, "rows": {_row_key(r): r.get("check") for r in rows}, "ties": gaps.to_dict()}
    emit(f"# reference: single-process mlx-lm on rank 0, same workload, {time.perf_counter() - start:.1f} s; "
         f"routing: {gaps.near_ties} near-tie(s) in {gaps.rows} routed rows (top-k gap at most "
         f"{ties.NEAR_TIE:g} of the scores' scale)")
    built.model = built.run_fn = None
    del built
    _release()
    return reference


def _verdicts(ctx: Context, entry: Dict[str, Any], guard, rows, reference) -> List[Dict[str, Any]]:
    """Rank 0: the mode's guard and rows checked against the reference; rows marked.

    The reference's own rows (``single``) are marked unchecked (``verified`` None).
    """
    tol = verify.tolerance(ctx.config)
    verdict = verify.compare({"logits": guard}, {"logits": reference["guard"]}, tol)
    entry["logits_max_abs_diff"] = verdict["logits_max_abs_diff"]
    entry["logits_scale"] = verdict["logits_scale"]
    entry["logits_max_rel_diff"] = verdict["logits_max_abs_diff"] / max(verdict["logits_scale"], 1e-30)
    entry["argmax_agrees"] = bool((guard.argmax(-1) == reference["guard"].argmax(-1)).all())
    entry["guard_verified"] = verdict["verified"]
    marked = []
    for row in rows:
        want = reference["rows"].get(_row_key(row))
        check = row.get("check")
        if check is want:  # the reference itself
            row_verdict = None
        elif not verdict["verified"]:
            row_verdict = dict(verdict, mismatch="guard prompt: " + verdict["mismatch"])
        elif check is None or want is None:
            row_verdict = None  # the workload has no output to compare (bench layer)
        else:
            row_verdict = verify.compare(check, want, tol)
            note = None if row_verdict["verified"] else ties.describe(reference.get("ties"))
            if note:  # still wrong: a near-tie explains a mismatch, it does not prove it harmless
                row_verdict.update(mismatch=f"{row_verdict['mismatch']}; {note}", routing_ties=reference["ties"])
        marked.append(verify.mark(row, row_verdict))
    return marked


def _decode_path(model) -> Dict[str, Any]:
    """Which code runs the model's decode steps, for the entry (holds no reference to the model)."""
    path = getattr(model, "cpu_path", None)
    fused = path is not None and path.decode_step is not None
    return {
        "fused_decode": fused,
        "decode_step": "moe_mpi's numpy decode step (moe_mpi.cpu.decode)" if fused else "the model's own code",
        "decode_step_off": path.decode_step_off if path is not None else None,
    }


def run_modes(
    ctx: Context,
    names: Sequence[str],
    workload: Callable[[Context, Built], List[Dict[str, Any]]],
    emit: Callable[[str], None],
) -> Dict[str, Dict[str, Any]]:
    """Builds each mode in turn, runs ``workload`` and checks its output.

    Collective. Plain mlx-lm in one process is the reference: the ``single``
    mode when it runs (first), else a reference pass of the same workload on
    rank 0 before the modes (once per run: kept in ``ctx.reference``). For each mode: free the previous model, reset
    the peak memory counters, build (timed), compute the guard prompt's
    logits, run ``workload(ctx, built)`` (rows meaningful on rank 0, each
    with a ``check`` of what it produced), check the guard and every row
    against the reference (:mod:`.verify`: a wrong row keeps no speed), then
    gather each rank's peak memory.

    Returns:
        On rank 0, mode name -> ``{"status", "reason", "rows", "logits_max_abs_diff",
        "memory", "load_seconds", "description", "notes", "drivers",
        "counted", "decode_path"}``; on other ranks the same keys with rows possibly empty.
    """
    debug = ctx.args.debug
    tokens = verify.guard_tokens(ctx.config, ctx.args.seed)
    order = sorted(names, key=lambda n: n != "single")
    reference: Dict[str, Any] = {}
    if "single" not in names:
        if ctx.reference is None:
            ctx.reference = _reference(ctx, workload, tokens, emit)
        reference = ctx.reference
    results: Dict[str, Dict[str, Any]] = {}
    for name in order:
        builder = get_mode(name)
        entry: Dict[str, Any] = {
            "status": "ok",
            "description": mode_description(name, ctx.args),
            "reason": None,
            "rows": [],
            "notes": [],
        }
        results[name] = entry
        reason = None
        with collective_phase(ctx.ctl, debug=debug):
            check = getattr(builder, "unsupported", None)
            reason = check(ctx) if check else None
        reasons = ctx.ctl.allgather(reason)
        reason = next((r for r in reasons if r), None)
        if reason:
            entry.update(status="skipped", reason=reason)
            emit(f"# mode {name}: skipped: {reason}")
            continue
        _release()
        mx.reset_peak_memory()
        report.reset_peak_rss()
        ctx.rss_floor_bytes = 0
        start = time.perf_counter()
        built = None
        with collective_phase(ctx.ctl, debug=debug):
            built = builder.build(ctx)
        load_seconds = ctx.ctl.allreduce_max(time.perf_counter() - start)
        # What the mode keeps resident, as opposed to its peak while loading.
        entry["model_bytes"] = ctx.ctl.allgather(int(mx.get_active_memory()))
        entry.update(_decode_path(built.model))
        emit(f"# mode {name}: built in {load_seconds:.1f} s; decode steps: {entry['decode_step']}; running")
        guard = built.run(lambda m: verify.guard_logits(m, tokens))
        rows = workload(ctx, built)
        if ctx.rank == 0:
            if name == "single":  # runs first: the other modes' reference
                reference = {"guard": guard, "rows": {_row_key(r): r.get("check") for r in rows}}
            rows = _verdicts(ctx, entry, guard, rows, reference)
        entry["drivers"] = list(built.drivers)
        entry["counted"] = built.counted
        entry["notes"] = list(built.notes)
        entry["load_seconds"] = load_seconds
        entry["rows"] = rows
        entry["memory"] = ctx.ctl.allgather(report.memory_info(ctx.rss_floor_bytes))
        # Drop every reference (the run closure holds the model too) before
        # the next mode allocates its own.
        built.model = built.run_fn = None
        del built
        _release()
    return {name: results[name] for name in names}


def _resolve_path(args: argparse.Namespace, ctl) -> tuple:
    """``(path, synthetic name or None)``; collective."""
    if args.model:
        from ..loading import resolve_model_path

        path = None
        with collective_phase(ctl, debug=args.debug):
            path = resolve_model_path(args.model)
        return path, None
    name = args.synthetic or "dbrx-like"
    return ensure_synthetic(name, ctl, args.cache_dir, args.debug), name


def run_benchmark(
    args: argparse.Namespace,
    *,
    benchmark: str,
    title: str,
    workload: Callable[[Context, Built], List[Dict[str, Any]]],
    method_lines: Sequence[str],
    render: Callable[[List[Dict[str, Any]]], List[str]],
    plot: Callable[[List[Dict[str, Any]], str, str], None],
    config_record: Dict[str, Any],
    context_tokens: Optional[Tuple[int, str]] = None,
) -> int:
    """The main of a model benchmark: set up, run every mode, report on rank 0.

    Args:
        args: Parsed options (:func:`add_common_arguments` plus the bench's).
        benchmark: ``"decode"``, ``"prefill"`` or ``"layer"``.
        title: First header line.
        workload: ``workload(ctx, built)`` -> rows (on rank 0), per mode.
        method_lines: Header lines saying how it is measured.
        render: Rows -> table lines (rank 0).
        plot: ``plot(rows, filename, title)`` for ``--plot``.
        config_record: The bench's parameters, for the JSON.
        context_tokens: ``(tokens, what)``: the longest sequence the bench
            runs and the options that make it, checked against the model's
            context before anything runs (far longer ones exhaust memory).

    Returns:
        The exit status.
    """
    from ..comm import Communicator, mlx_group
    from ..loading import read_config
    from ..prompts import check_prompt_length
    from ..runner import abort_on_error
    from .machine import header_lines, machine_info

    comm = Communicator(backend=args.backend)
    # Control traffic on a duplicate communicator, outside the model's counters.
    ctl = Communicator(comm.comm.Dup())

    def emit(line: str) -> None:
        if comm.rank == 0:
            print(line, flush=True)

    with abort_on_error(comm, debug=args.debug):
        with collective_phase(ctl, debug=args.debug):
            if comm.rank == 0:
                report.check_plot_available(args.plot)
                report.check_output_dirs(args.json, args.plot)
        path, synthetic = _resolve_path(args, ctl)
        config = None
        with collective_phase(ctl, debug=args.debug):
            config = read_config(Path(path))
            if context_tokens is not None:
                check_prompt_length(context_tokens[0], config, context_tokens[1])
        info = machine_info(ctl)
        blas = ctl.allgather(report.blas_info())
        # Every MOE_MPI_* switch each rank runs with (mpirun -x can differ per rank).
        switch_sets = ctl.allgather(switches.in_force())
        ranks_per_host = {n["hostname"]: len(n["ranks"]) for n in info["nodes"]}
        group = mlx_group()
        ctx = Context(comm, ctl, Path(path), config, group, args)
        modes = args.modes or default_modes()
        model_line = describe_model(config, synthetic, path)
        version = report.code_version() if comm.rank == 0 else {}
        extra = [model_line]
        if version:
            modified = version["modified"]
            extra.append(
                f"moe_mpi: git {version['commit'][:12]}"
                + (f" + modified {', '.join(modified)}" if modified else " (clean)")
            )
        extra += [f"mode {n}: {mode_description(n, args)}" for n in modes]
        extra += report.blas_lines(blas, ranks_per_host)
        extra += report.switch_lines(switch_sets)
        extra += list(method_lines)
        for line in header_lines(info, title, extra):
            emit(line)
        if comm.size == 1:
            emit("# NOTE: 1 rank: ep/central/mlx-lm-tp degenerate to one process")
        rounds = []
        for number in range(args.rounds):
            if args.rounds > 1:
                emit(f"# round {number + 1} of {args.rounds}")
            results = run_modes(ctx, modes, workload, emit)
            rows = report.attach_mode_info(results)
            for row in rows:
                row["round"] = number + 1
            rounds.append(rows)
        rows = report.median_rounds(rounds)
        if args.rounds > 1:
            for line in report.round_lines(rounds):
                emit(line)
        for line in render(rows):
            emit(line)
        for line in report.check_lines(results, rows):
            emit(line)
        with collective_phase(ctl, debug=args.debug):
            if comm.rank == 0:
                payload = {
                    "benchmark": benchmark,
                    "command": info["command"],
                    "launcher": info.get("launcher"),
                    "machine": info,
                    "blas": blas,
                    "switches": switch_sets,
                    "warnings": report.blas_warnings(blas, ranks_per_host),
                    "world_size": comm.size,
                    "code_version": version,
                    "model": {
                        "path": str(path),
                        "synthetic": synthetic,
                        "config": config,
                        "description": model_line,
                    },
                    "config": dict(
                        config_record,
                        modes=modes,
                        backend=args.backend,
                        seed=args.seed,
                        rounds=args.rounds,
                    ),
                    "method": list(method_lines),
                    "modes": {
                        n: {k: v for k, v in e.items() if k != "rows"}
                        for n, e in results.items()
                    },
                    "rows": rows,
                    "rounds": rounds,
                }
                if args.json:
                    report.write_results(args.json, payload)
                if args.plot:
                    name = synthetic or Path(path).name
                    title = f"{name}, {comm.size} ranks ({info.get('cpu')})"
                    plot(rows, args.plot, title)
    return 0
