"""``moe-mpi bench collectives``: sum all-reduce latency and bandwidth sweep.

The one collective on moe_mpi's hot path is a sum all-reduce of the MoE block
output per layer. This benchmark measures it the way OSU's ``osu_allreduce``
and nccl-tests' ``all_reduce_perf`` do, for each data path moe_mpi can use,
side by side in the same run::

    mpirun -n 2 moe-mpi bench collectives                 # 4 B .. 64 MiB
    mpirun -n 2 moe-mpi bench collectives -m 4:1M -i 2000 --json ar.json
    mpirun -n 2 moe-mpi bench collectives -m 3K:3K        # one decode token, H=768

(as root add ``--allow-run-as-root``; more ranks than cores need
``--oversubscribe``). Data paths (``--paths``):

* ``mpi4py-numpy``: ``comm.Allreduce`` from one numpy buffer into another,
  the least any Python path can cost (the floor).
* ``mlx-mpi4py``: ``Communicator(backend="mpi4py").all_sum`` on an evaluated
  ``mx.array``, i.e. buffer view -> ``Allreduce`` -> new ``mx.array``.
* ``mlx-distributed``: ``Communicator(backend="mlx").all_sum``, i.e.
  ``mx.distributed.all_sum`` on MLX's MPI group, then ``mx.eval``.

Each call is timed as the model makes it: ``comm.all_sum(x)`` on an
evaluated ``x``. On return the reduction has completed on both mlx paths
(``Communicator`` evaluates the ``mx.distributed`` result itself); only for
16-bit dtypes does the mpi4py path leave its float32 -> 16-bit cast lazy,
to run fused into the caller's next evaluation, so that cast is not timed.

Method (OSU's): per message size, ``-x`` warm-up calls, then ``-i`` timed
calls, each timed alone with ``MPI.Wtime`` and followed by a ``Barrier``
(not timed), after a ``Barrier`` before the loop. Sizes above
``--large-threshold`` use ``--iterations-large``/``--warmup-large``. Each rank
averages its own calls; the table shows the average, minimum and maximum of
those per-rank averages across ranks (OSU's ``-f`` output). ``algbw`` is
size / avg time and ``busbw`` = algbw * 2(n-1)/n (nccl-tests' definitions,
with the time averaged over ranks, which is nccl-tests' default ``-a 1``).
GB/s means 10^9 bytes/s. An extra ``p50`` column (each rank's median call,
averaged over ranks) is not in OSU: on a busy machine a few calls stalled by
the scheduler (milliseconds each) dominate the mean of thousands of
microsecond calls, while the median still shows the cost of the path; the
summary ranks the paths by both.

Check (nccl-tests'): rank r contributes ``(r+1) * pattern``, where
``pattern`` holds small positive integers chosen so that the sum
``n(n+1)/2 * pattern`` is exact in the dtype; after the timed loop one more
call's result is compared with that, and ``#wrong`` is the number of wrong
elements summed over ranks. Any wrong element makes the command exit 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runner import abort_on_error, add_debug_argument, collective_phase, parse_args
from .machine import format_load, format_size, header_lines, machine_info
from .sweep import (
    add_loop_arguments,
    add_output_arguments,
    check_outputs,
    emit_footer,
    loop_counts,
    message_sizes,
    parse_size,
    parse_size_range,
    plot_latency,
    write_results,
)

__all__ = [
    "PATHS",
    "check_pattern",
    "count_wrong",
    "expected_sum",
    "main",
    "message_sizes",
    "parse_size",
    "parse_size_range",
    "plot_latency",
    "rank_input",
    "run_collectives",
    "setup_arg_parser",
]

#: Data path name -> one-line description (``--paths`` chooses among these).
PATHS = {
    "mpi4py-numpy": "comm.Allreduce on numpy buffers (the floor)",
    "mlx-mpi4py": 'Communicator(backend="mpi4py").all_sum on mx.array',
    "mlx-distributed": 'Communicator(backend="mlx").all_sum '
    "(mx.distributed.all_sum + mx.eval)",
}

DTYPES = ("float32", "float16", "bfloat16")

# Defaults. OSU's collectives use 1000/100 iterations and 200/10 warm-up
# calls with 8 KiB as the large-message threshold; fewer warm-up calls are
# enough here (no GPU clocks or registration caches to warm up).
DEFAULT_SIZES = "4:64M"
DEFAULT_ITERATIONS = 1000
DEFAULT_ITERATIONS_LARGE = 100
DEFAULT_WARMUP = 20
DEFAULT_WARMUP_LARGE = 5

# Largest integer up to which every integer is exact in the dtype
# (2 ** significand bits), and the dtype's machine epsilon.
_EXACT_LIMIT = {"float32": 1 << 24, "float16": 1 << 11, "bfloat16": 1 << 8}
_EPSILON = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# Pattern values are drawn from 1..k with k at most this: more distinct
# values catch more misplaced elements; small values keep sums exact.
_MAX_PATTERN = 8

_CSV_COLUMNS = (
    "path",
    "dtype",
    "size_bytes",
    "count",
    "iterations",
    "warmup",
    "avg_us",
    "min_us",
    "max_us",
    "p50_us",
    "algbw_GBps",
    "busbw_GBps",
    "wrong",
)

# ------------------------------------------------------------------ sizes


def _paths_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown path(s) {', '.join(unknown) or repr(text)}; "
            f"choose from {', '.join(PATHS)}"
        )
    return list(dict.fromkeys(names))  # drop repeats, keep order


# ------------------------------------------------------------- validation


def check_pattern(
    count: int, nranks: int, dtype: str = "float32"
) -> tuple[np.ndarray, float]:
    """The data to reduce and the tolerance of the check.

    Every rank calls this with the same arguments and gets the same
    ``pattern``: ``count`` integers in ``1..k`` (float32), pseudo-random so
    that misplaced elements are caught, with ``k`` as large as possible
    (up to 8) while ``n(n+1)/2 * k`` stays exactly representable in
    ``dtype``. Then every partial sum is an exact integer, whatever order
    the MPI library adds in, and the check can demand equality.

    Args:
        count: Number of elements.
        nranks: Number of ranks reducing.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Returns:
        ``(pattern, rtol)``. ``rtol`` is 0.0 (exact) unless even ``k = 1``
        overflows the exact range (e.g. bfloat16 on more than 22 ranks);
        then it is ``nranks * eps(dtype)``, a bound on the rounding error
        of summing ``nranks`` positive terms.
    """
    triangle = nranks * (nranks + 1) // 2
    k = min(_MAX_PATTERN, _EXACT_LIMIT[dtype] // triangle)
    rtol = 0.0
    if k < 1:
        k, rtol = 1, nranks * _EPSILON[dtype]
    # Seeded by count: identical on every rank without communication.
    rng = np.random.default_rng(count)
    pattern = rng.integers(1, k + 1, size=count, dtype=np.int16).astype(np.float32)
    return pattern, rtol


def rank_input(pattern: np.ndarray, rank: int) -> np.ndarray:
    """Rank ``rank``'s contribution: ``(rank + 1) * pattern`` (float32)."""
    return pattern * np.float32(rank + 1)


def expected_sum(pattern: np.ndarray, nranks: int) -> np.ndarray:
    """The correct sum over ``nranks`` ranks: ``n(n+1)/2 * pattern``."""
    return pattern * np.float32(nranks * (nranks + 1) // 2)


def count_wrong(result: Any, expected: np.ndarray, rtol: float = 0.0) -> int:
    """Number of elements of ``result`` that differ from ``expected``.

    Args:
        result: Array-like (numpy, or an evaluated float32 ``mx.array``)
            with as many elements as ``expected``.
        expected: From :func:`expected_sum`.
        rtol: 0.0 for exact equality, else the allowed relative error.

    Returns:
        The count of wrong elements (NaN counts as wrong). A result of the
        wrong size counts every expected element as wrong.
    """
    got = np.asarray(result).reshape(-1)
    want = expected.reshape(-1)
    if got.size != want.size:
        return int(want.size)
    got64 = got.astype(np.float64)
    want64 = want.astype(np.float64)
    if rtol == 0.0:
        ok = got64 == want64
    else:
        ok = np.abs(got64 - want64) <= rtol * np.abs(want64)
    return int(want.size - np.count_nonzero(ok))


# ------------------------------------------------------------------ paths


@dataclass
class _Case:
    """One data path ready to run on one message."""

    run: Callable[[], None]
    # Runs one more call and returns its result as something numpy can read.
    result: Callable[[], Any]


def _as_float32(out):
    import mlx.core as mx

    return out if out.dtype == mx.float32 else out.astype(mx.float32)


def _make_case(
    path: str, comms: Mapping[str, Any], data: np.ndarray, dtype: str
) -> _Case:
    """Buffers and callables for ``path`` on this rank's float32 ``data``."""
    if path == "mpi4py-numpy":
        from mpi4py import MPI

        mpi_comm = comms["mpi4py"].comm
        send = data.astype(np.dtype(dtype))
        recv = np.empty_like(send)

        def run() -> None:
            mpi_comm.Allreduce(send, recv, op=MPI.SUM)

        def result():
            # Poison first, so a call that wrote nothing cannot pass on the
            # previous call's correct values.
            recv.fill(np.nan)
            run()
            return recv

        return _Case(run, result)

    import mlx.core as mx

    comm = comms["mpi4py" if path == "mlx-mpi4py" else "mlx"]
    x = mx.array(data).astype(getattr(mx, dtype))
    mx.eval(x)

    def run() -> None:
        # Timed exactly as the model calls it. all_sum's own mx.eval(x) is a
        # no-op here (x is evaluated); the mlx backend evaluates the sum
        # before returning, the mpi4py backend has completed the reduction.
        comm.all_sum(x)

    def result():
        out = comm.all_sum(x)
        return np.asarray(_as_float32(out))

    return _Case(run, result)


def _open_paths(
    comm, wanted: Sequence[str], dtype: str
) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Communicators for the wanted paths, and why any path is skipped.

    Collective: every rank learns the same set of runnable paths.
    """
    from mpi4py import MPI

    from ..comm import Communicator
    from ..mpi_dtypes import native_float16

    comms: dict[str, Any] = {"mpi4py": comm}
    local_reason = None
    if "mlx-distributed" in wanted:
        try:
            comms["mlx"] = Communicator(comm.comm, backend="mlx")
        except (RuntimeError, ValueError) as e:
            local_reason = str(e)
    # The mlx group could come up on some ranks only (e.g. MLX_MPI_LIBNAME
    # differs between hosts); every rank must skip the path if any must.
    reasons = comm.allgather(local_reason)
    skipped: dict[str, str] = {}
    failed = [(rank, r) for rank, r in enumerate(reasons) if r is not None]
    if failed:
        rank, reason = failed[0]
        skipped["mlx-distributed"] = f"unavailable on rank {rank}: {reason}"
        comms.pop("mlx", None)
    if "mpi4py-numpy" in wanted:
        if dtype == "bfloat16":
            skipped["mpi4py-numpy"] = "numpy has no bfloat16 type"
        elif dtype == "float16" and not native_float16(MPI):
            skipped["mpi4py-numpy"] = "this MPI library has no float16 type"
    runnable = [path for path in wanted if path not in skipped]
    return comms, runnable, skipped


# ----------------------------------------------------------------- timing


def time_calls(
    mpi_comm, run: Callable[[], None], iterations: int, warmup: int
) -> np.ndarray:
    """This rank's seconds for each timed call of ``run``, OSU style.

    A ``Barrier`` before the loop, then ``warmup + iterations`` calls; each
    is timed alone with ``MPI.Wtime`` and followed by an untimed
    ``Barrier``, so every call starts with the ranks in step (as the
    all-reduce of each layer does, after the ranks' expert work).

    Returns:
        ``iterations`` durations; OSU reports their mean.
    """
    from mpi4py import MPI

    wtime = MPI.Wtime
    barrier = mpi_comm.Barrier
    samples = np.empty(iterations, dtype=np.float64)
    barrier()
    for i in range(warmup + iterations):
        start = wtime()
        run()
        stop = wtime()
        if i >= warmup:
            samples[i - warmup] = stop - start
        barrier()
    return samples


def _gather_stats(mpi_comm, samples: np.ndarray, wrong: int) -> np.ndarray:
    """Every rank's (mean seconds, median seconds, wrong elements)."""
    mine = np.array(
        [samples.mean(), np.median(samples), float(wrong)], dtype=np.float64
    )
    everyone = np.empty((mpi_comm.Get_size(), 3), dtype=np.float64)
    mpi_comm.Allgather(mine, everyone)
    return everyone


def _row(path, dtype, nbytes, count, iterations, warmup, stats, nranks, checked):
    per_rank_us = stats[:, 0] * 1e6
    per_rank_p50_us = stats[:, 1] * 1e6
    avg_us = float(per_rank_us.mean())
    algbw = nbytes / (avg_us * 1e-6) / 1e9 if avg_us > 0 else 0.0
    return {
        "path": path,
        "dtype": dtype,
        "size_bytes": nbytes,
        "count": count,
        "iterations": iterations,
        "warmup": warmup,
        "avg_us": avg_us,
        "min_us": float(per_rank_us.min()),
        "max_us": float(per_rank_us.max()),
        "p50_us": float(per_rank_p50_us.mean()),
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * 2 * (nranks - 1) / nranks,
        "wrong": int(stats[:, 2].sum()) if checked else None,
        "per_rank_us": [float(t) for t in per_rank_us],
        "per_rank_p50_us": [float(t) for t in per_rank_p50_us],
    }


_TABLE_HEADER = (
    f"# {'size(B)':>10} {'count':>10}  {'path':<16} {'avg(us)':>10} {'min(us)':>10} "
    f"{'max(us)':>10} {'p50(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} "
    f"{'#wrong':>7} {'iters':>6}"
)


def _format_row(row: Mapping[str, Any]) -> str:
    wrong = "n/a" if row["wrong"] is None else str(row["wrong"])
    return (
        f"  {row['size_bytes']:>10} {row['count']:>10}  {row['path']:<16} "
        f"{row['avg_us']:>10.2f} {row['min_us']:>10.2f} {row['max_us']:>10.2f} "
        f"{row['p50_us']:>10.2f} {row['algbw_GBps']:>11.3f} {row['busbw_GBps']:>11.3f} {wrong:>7} "
        f"{row['iterations']:>6}"
    )


def summary_lines(rows: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[str]:
    """Side-by-side latency per path and the fastest path, per size.

    Two tables: by ``avg_us`` (OSU's statistic) and by ``p50_us``, which a
    few scheduler stalls on a busy machine cannot move.
    """
    width = max(16, *(len(p) for p in paths)) if paths else 16
    lines: list[str] = []
    for key, what in (
        ("avg_us", "average latency (us, OSU's avg)"),
        ("p50_us", "median latency (us, p50: robust to scheduler stalls)"),
    ):
        by_size: dict[int, dict[str, float]] = {}
        for row in rows:
            by_size.setdefault(row["size_bytes"], {})[row["path"]] = row[key]
        lines += [
            "#",
            f"# By data path: {what}; lower is better",
            f"# {'size':>10}  "
            + " ".join(f"{p:>{width}}" for p in paths)
            + "  fastest",
        ]
        for size, latencies in by_size.items():
            cells = " ".join(
                f"{latencies[p]:>{width}.2f}" if p in latencies else f"{'-':>{width}}"
                for p in paths
            )
            fastest = min(latencies, key=latencies.get)
            lines.append(f"  {format_size(size):>10}  {cells}  {fastest}")
    return lines


def run_collectives(
    comm,
    args: argparse.Namespace,
    comms: Mapping[str, Any],
    paths: Sequence[str],
    emit: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Run the sweep; return one row per (size, path) on every rank.

    Args:
        comm: The ``mpi4py``-backend :class:`moe_mpi.comm.Communicator`.
        args: Parsed options.
        comms: Communicators by backend (from :func:`_open_paths`).
        paths: Paths to run, in column order.
        emit: Prints a line (rank 0) or discards it (other ranks).
    """
    mpi_comm = comm.comm
    nranks, rank = comm.size, comm.rank
    itemsize = 4 if args.dtype == "float32" else 2
    check = not args.no_check
    rows: list[dict[str, Any]] = []
    for size in message_sizes(*args.message_size):
        count = size // itemsize
        if count == 0:
            emit(f"# {size} B: smaller than one {args.dtype} element, skipped")
            continue
        nbytes = count * itemsize
        iterations, warmup = loop_counts(args, nbytes)
        pattern, rtol = check_pattern(count, nranks, args.dtype)
        data = rank_input(pattern, rank)
        expected = expected_sum(pattern, nranks) if check else None
        del pattern
        # Paths interleaved per size, not one sweep per path, so a change of
        # machine load during the run hits all paths alike.
        for path in paths:
            case = _make_case(path, comms, data, args.dtype)
            samples = time_calls(mpi_comm, case.run, iterations, warmup)
            wrong = count_wrong(case.result(), expected, rtol) if check else 0
            stats = _gather_stats(mpi_comm, samples, wrong)
            row = _row(
                path,
                args.dtype,
                nbytes,
                count,
                iterations,
                warmup,
                stats,
                nranks,
                check,
            )
            rows.append(row)
            emit(_format_row(row))
            del case
    return rows


# ------------------------------------------------------------------- plot


def _plot_rows(rows, paths, filename, info, dtype):
    series, medians = {}, {}
    for path in paths:
        mine = [r for r in rows if r["path"] == path]
        series[path] = (
            [r["size_bytes"] for r in mine],
            [r["avg_us"] for r in mine],
            [r["min_us"] for r in mine],
            [r["max_us"] for r in mine],
        )
        medians[path] = [r["p50_us"] for r in mine]
    hosts = len(info["nodes"])
    cores = (info.get("cores") or {}).get("logical")
    title = (
        f"sum all-reduce, {dtype}, {info['world_size']} ranks on {hosts} "
        f"host{'s' if hosts != 1 else ''} ({info.get('cpu') or 'unknown cpu'}, "
        f"{cores} cores, load avg {format_load(info.get('loadavg'))})\n"
        "solid: avg over ranks of per-rank mean (band: min-max over ranks); "
        "dashed: p50"
    )
    plot_latency(series, filename, title, medians=medians)


# -------------------------------------------------------------------- CLI


def setup_arg_parser() -> argparse.ArgumentParser:
    """The options of ``moe-mpi bench collectives``."""
    parser = argparse.ArgumentParser(
        prog="moe-mpi bench collectives",
        description="Sum all-reduce latency/bandwidth sweep over moe_mpi's data "
        "paths, in the style of osu_allreduce and nccl-tests' all_reduce_perf. "
        "Run under mpirun: mpirun -n N moe-mpi bench collectives ...",
        epilog="paths: " + "; ".join(f"{name}: {text}" for name, text in PATHS.items()),
    )
    add_loop_arguments(
        parser,
        sizes=DEFAULT_SIZES,
        default_min=4,
        iterations=DEFAULT_ITERATIONS,
        iterations_large=DEFAULT_ITERATIONS_LARGE,
        warmup=DEFAULT_WARMUP,
        warmup_large=DEFAULT_WARMUP_LARGE,
    )
    parser.add_argument(
        "-d",
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="element type (default: float32)",
    )
    parser.add_argument(
        "--paths",
        type=_paths_arg,
        default=list(PATHS),
        help=f"comma-separated data paths (default: {','.join(PATHS)})",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip checking the results (#wrong shows n/a)",
    )
    add_output_arguments(parser)
    add_debug_argument(parser)
    return parser


def _method_lines(args, paths, skipped) -> list[str]:
    iterations_large, warmup_large = loop_counts(args, args.large_threshold + 1)
    lines = [
        f"dtype: {args.dtype}; op: sum; sizes: {format_size(args.message_size[0])}"
        f" to {format_size(args.message_size[1])}",
        f"loop: -x {args.warmup} warm-up + -i {args.iterations} timed calls per size;"
        f" above {format_size(args.large_threshold)}: {warmup_large} + {iterations_large}",
        "timing: Barrier, then each call timed alone (MPI.Wtime) and followed by"
        " an untimed Barrier (OSU)",
        "avg/min/max: over ranks of each rank's mean latency (OSU -f); p50: each"
        " rank's median call, averaged over ranks (not in OSU); algbw ="
        " size/avg; busbw = algbw*2(n-1)/n (nccl-tests, time averaged over ranks as"
        " its default -a 1); GB/s = 1e9 B/s",
        "#wrong: "
        + (
            "elements differing from the exact sum, summed over ranks"
            if not args.no_check
            else "not checked (--no-check)"
        ),
    ]
    for path in paths:
        lines.append(f"path {path}: {PATHS[path]}")
    for path, reason in skipped.items():
        lines.append(f"NOTE: path {path} skipped: {reason}")
    if args.dtype != "float32" and "mlx-mpi4py" in paths:
        if args.dtype == "bfloat16" or "mpi4py-numpy" in skipped:
            lines.append(
                "NOTE: mlx-mpi4py reduces this dtype in float32 (2x the bytes on the"
                " wire; the cast back stays lazy and is not timed); size/count"
                " columns are in the requested dtype"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moe-mpi bench collectives`` with ``argv`` (default: sys.argv[1:]).

    Returns:
        0, or 1 if any result was wrong.
    """
    args = parse_args(setup_arg_parser(), argv)
    # Communicator() initialises MPI with MLX first (see moe_mpi.comm), which
    # the mlx-distributed path needs; mpi4py.MPI may be imported only after.
    from ..comm import Communicator

    comm = Communicator()
    with abort_on_error(comm, debug=args.debug):
        with collective_phase(comm, debug=args.debug):
            if comm.rank == 0:
                check_outputs(args)
        info = machine_info(comm)
        comms, paths, skipped = _open_paths(comm, args.paths, args.dtype)

        def emit(line: str) -> None:
            if comm.rank == 0:
                print(line, flush=True)

        title = "moe-mpi bench collectives: sum all-reduce (osu_allreduce / all_reduce_perf style)"
        for line in header_lines(info, title, _method_lines(args, paths, skipped)):
            emit(line)
        if comm.size == 1:
            emit(
                "# NOTE: 1 rank: the Communicator paths return their input without"
                " communicating; run under mpirun -n 2 or more"
            )
        if not paths:
            emit("# no data path left to run")
        emit("#")
        emit(_TABLE_HEADER)
        rows = run_collectives(comm, args, comms, paths, emit)
        wrong = sum(row["wrong"] or 0 for row in rows)
        for line in summary_lines(rows, paths):
            emit(line)
        load_end = emit_footer(emit, wrong, not args.no_check)
        with collective_phase(comm, debug=args.debug):
            if comm.rank == 0:
                config = {
                    "dtype": args.dtype,
                    "op": "sum",
                    "paths": paths,
                    "skipped_paths": skipped,
                    "timing": "OSU: each call timed alone with MPI.Wtime, "
                    "untimed Barrier after each; per-rank mean; "
                    "avg/min/max over ranks; algbw/busbw from the avg",
                }
                write_results(args, "collectives", info, config, rows, wrong, load_end, _CSV_COLUMNS)
                if args.plot:
                    _plot_rows(rows, paths, args.plot, info, args.dtype)
    return 1 if wrong else 0
