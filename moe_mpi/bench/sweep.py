"""OSU-style message-size sweeps, shared by ``moe-mpi bench collectives`` and ``pingpong``.

Both follow the OSU micro-benchmarks' conventions: ``-m [MIN:]MAX`` message
sizes doubling from MIN to MAX, ``-i``/``-x`` timed and warm-up iterations
with fewer for sizes above ``--large-threshold``, and ``--json``/``--csv``/
``--plot`` outputs. This module holds those pieces; each benchmark keeps
its own measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..argtypes import non_negative_int, positive_int
from ..errors import UserError
from ..results import check_writable
from .machine import format_load, format_size, load_average, write_csv, write_json

DEFAULT_LARGE_THRESHOLD = 8192


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)


_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536. Suffixes K, M, G are binary (as OSU's ``-m``).

    A trailing ``B`` or ``iB`` is accepted (``64KiB``, ``4B``).

    Raises:
        ValueError: Not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a message size: {text!r} (examples: 4, 64K, 1M)")
    return int(match.group(1)) * _SUFFIX[match.group(2).lower()]


def parse_size_range(text: str, default_min: int = 4) -> tuple[int, int]:
    """Parse OSU's ``-m`` value: ``MIN:MAX``, ``MAX``, ``:MAX`` or ``MIN:``.

    Args:
        text: The option value.
        default_min: Minimum when ``text`` gives only the maximum.

    Returns:
        ``(min_bytes, max_bytes)``.

    Raises:
        ValueError: Malformed, or min > max.
    """
    low_text, sep, high_text = text.partition(":")
    if not sep:
        low, high = default_min, parse_size(text)
        low = min(low, high)
    else:
        low = parse_size(low_text) if low_text.strip() else default_min
        high = parse_size(high_text) if high_text.strip() else max(low, 64 << 20)
    if low > high:
        raise ValueError(f"message size range {text!r}: minimum exceeds maximum")
    return low, high


def message_sizes(low: int, high: int) -> list[int]:
    """Sizes from ``low`` doubling up to ``high`` (0 is followed by 1), as OSU."""
    sizes = []
    size = low
    if size == 0:
        sizes.append(0)
        size = 1
    while size <= high:
        sizes.append(size)
        size *= 2
    return sizes


def _size_range_arg(default_min: int) -> Callable[[str], tuple[int, int]]:
    def convert(text: str) -> tuple[int, int]:
        try:
            return parse_size_range(text, default_min)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_loop_arguments(
    parser: argparse.ArgumentParser,
    *,
    sizes: str,
    default_min: int,
    iterations: int,
    iterations_large: int,
    warmup: int,
    warmup_large: int,
) -> None:
    """Add OSU's loop options (``-m``, ``-i``, ``-x``, ...) to ``parser``.

    Shared with ``moe-mpi bench pingpong``.
    """
    parser.add_argument(
        "-m",
        "--message-size",
        metavar="[MIN:]MAX",
        type=_size_range_arg(default_min),
        default=parse_size_range(sizes, default_min),
        help=f"message sizes in bytes, doubling from MIN to MAX; suffixes K, M, G "
        f"(binary), as OSU's -m (default: {sizes})",
    )
    parser.add_argument(
        "-i",
        "--iterations",
        type=positive_int,
        default=iterations,
        help=f"timed iterations per size (default: {iterations})",
    )
    parser.add_argument(
        "-x",
        "--warmup",
        type=non_negative_int,
        default=warmup,
        help=f"warm-up iterations per size (default: {warmup})",
    )
    parser.add_argument(
        "--iterations-large",
        type=positive_int,
        default=None,
        help="timed iterations for sizes above --large-threshold "
        f"(default: min(-i, {iterations_large}))",
    )
    parser.add_argument(
        "--warmup-large",
        type=non_negative_int,
        default=None,
        help="warm-up iterations for sizes above --large-threshold "
        f"(default: min(-x, {warmup_large}))",
    )
    parser.add_argument(
        "--large-threshold",
        metavar="BYTES",
        type=parse_size,
        default=DEFAULT_LARGE_THRESHOLD,
        help="sizes above this are 'large' (default: 8K, OSU's LARGE_MESSAGE_SIZE)",
    )
    parser.set_defaults(
        _iterations_large_default=iterations_large,
        _warmup_large_default=warmup_large,
    )


def loop_counts(args: argparse.Namespace, nbytes: int) -> tuple[int, int]:
    """``(iterations, warmup)`` for a message of ``nbytes`` (OSU's rule)."""
    if nbytes > args.large_threshold:
        iterations = args.iterations_large
        if iterations is None:
            iterations = min(args.iterations, args._iterations_large_default)
        warmup = args.warmup_large
        if warmup is None:
            warmup = min(args.warmup, args._warmup_large_default)
        return iterations, warmup
    return args.iterations, args.warmup


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--csv``, ``--json`` and ``--plot`` (shared with pingpong)."""
    parser.add_argument("--csv", metavar="FILE", help="also write the rows as CSV")
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write machine info, command and rows as JSON",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="plot latency against message size (needs matplotlib)",
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Fail early (before a long sweep) if the output files cannot be written.

    Raises:
        UserError: matplotlib missing for ``--plot``, or an output file
            cannot be written (see :func:`moe_mpi.results.check_writable`).
    """
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError(
            "--plot needs matplotlib, which is not installed; install it with "
            f"`{sys.executable} -m pip install matplotlib`"
        )
    for option in ("csv", "json", "plot"):
        check_writable(getattr(args, option), f"--{option}")


def emit_footer(emit: Callable[[str], None], wrong: int, check: bool) -> list[float] | None:
    """Prints the closing lines of a run (``#wrong`` total, end load).

    Returns:
        The load average at the end, for the JSON.
    """
    if check:
        emit("#")
        emit(f"# #wrong in total: {wrong} " + ("(OK)" if wrong == 0 else "(FAILED)"))
    load_end = load_average()
    emit("# load average (1/5/15 min) at end, rank 0's host: " + format_load(load_end))
    return load_end


def write_results(
    args: argparse.Namespace,
    benchmark: str,
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    rows: list[dict],
    wrong: int,
    load_end: list[float] | None,
    csv_columns: Sequence[str],
) -> None:
    """Writes ``--json`` and ``--csv`` (rank 0) with the loop settings in the config."""
    iterations_large, warmup_large = loop_counts(args, args.large_threshold + 1)
    if args.json:
        loops = {
            "sizes": list(args.message_size),
            "iterations": args.iterations,
            "warmup": args.warmup,
            "iterations_large": iterations_large,
            "warmup_large": warmup_large,
            "large_threshold": args.large_threshold,
            "check": not args.no_check,
        }
        write_json(
            args.json,
            {
                "benchmark": benchmark,
                "machine": info,
                "command": info["command"],
                "config": {**config, **loops},
                "rows": rows,
                "wrong_total": wrong,
                "loadavg_end": load_end,
            },
        )
    if args.csv:
        write_csv(args.csv, rows, csv_columns)


def plot_latency(
    series: Mapping[
        str, tuple[Sequence[int], Sequence[float], Sequence[float], Sequence[float]]
    ],
    filename: str,
    title: str,
    ylabel: str = "latency (µs)",
    medians: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Log-log plot of latency against message size, one line per series.

    Args:
        series: name -> (sizes in bytes, avg, min, max latency in µs); the
            min-max band is shaded when it differs from the average.
        filename: Output image (PNG).
        title: Plot title.
        ylabel: Label of the y axis.
        medians: Optional name -> median latency per size (µs), drawn
            dashed in the series' colour.

    Raises:
        UserError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "--plot needs matplotlib; install it with "
            f"`{sys.executable} -m pip install matplotlib`"
        ) from None
    matplotlib.use("Agg")  # no display needed (and none on a cluster node)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    all_sizes: set[int] = set()
    for name, (sizes, avg, low, high) in series.items():
        # Log axes cannot show 0 B (pingpong's first size).
        points = [
            (s, a, lo, hi) for s, a, lo, hi in zip(sizes, avg, low, high) if s > 0
        ]
        if not points:
            continue
        xs, ys, lows, highs = zip(*points)
        (line,) = ax.plot(
            xs, ys, marker="o", markersize=3, label=f"{name} avg" if medians else name
        )
        if any(lo != hi for lo, hi in zip(lows, highs)):
            ax.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
        if medians and name in medians:
            p50 = [m for s, m in zip(sizes, medians[name]) if s > 0]
            ax.plot(
                xs, p50, linestyle="--", color=line.get_color(), label=f"{name} p50"
            )
        all_sizes.update(xs)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(all_sizes)
    if len(ticks) > 12:  # keep labels readable: every other power of two
        ticks = ticks[:: math.ceil(len(ticks) / 12)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_size(t).replace(" ", "") for t in ticks], rotation=45)
    ax.set_xlabel("message size")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)
