"""``moe-mpi bench <benchmark>``: benchmarks of expert-parallel inference.

Each benchmark is a module ``moe_mpi.bench.<name>`` exposing
``setup_arg_parser()`` and ``main(argv=None)``, imported only when it runs
(as the top-level ``moe-mpi`` commands are)::

    mpirun -n 2 moe-mpi bench collectives -m 4:1M
    mpirun -n 2 moe-mpi bench pingpong
    moe-mpi bench collectives --help

:mod:`moe_mpi.bench.machine` describes the machine and writes result files
for all of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from ..runner import PROG, parse_args

__all__ = ["BENCHMARKS", "main", "setup_arg_parser"]

#: Benchmark name -> one-line description.
BENCHMARKS = {
    "collectives": "Sum all-reduce latency/bandwidth sweep per data path "
    "(osu_allreduce / nccl-tests style).",
    "pingpong": "Point-to-point latency between ranks 0 and 1 (osu_latency style).",
    "decode": "Decode tokens/s of an MoE model across the ranks.",
    "prefill": "Prefill tokens/s of an MoE model across the ranks.",
    "layer": "Time of one expert-parallel MoE layer.",
    "roofline": "Memory-bandwidth limit of decode per mode (STREAM probe + bytes per token).",
    "serve": "Concurrent clients against moe-mpi serve and mlx_lm.server (run alone, not under mpirun).",
    "plot": "Plot results of several runs (tokens/s by mode and rank count, all-reduce latency).",
}


def _module_name(benchmark: str) -> str:
    return f"{__name__}.{benchmark}"


def setup_arg_parser() -> argparse.ArgumentParser:
    """The parser of ``moe-mpi bench``: a benchmark name, then its options."""
    width = max(len(name) for name in BENCHMARKS)
    parser = argparse.ArgumentParser(
        prog=f"{PROG} bench",
        usage="%(prog)s [-h] BENCHMARK [options]",
        description="Benchmark expert-parallel inference and its communication. "
        f"Run on N ranks with: mpirun -n N {PROG} bench BENCHMARK ...",
        epilog="benchmarks:\n"
        + "\n".join(f"  {name:<{width}}  {text}" for name, text in BENCHMARKS.items())
        + f"\n\nRun '{PROG} bench BENCHMARK --help' for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "benchmark",
        metavar="BENCHMARK",
        choices=list(BENCHMARKS),
        help="which benchmark",
    )
    return parser


def _check_installed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Listed benchmarks whose module is not there (yet) get a usage error
    # here, printed once by rank 0, rather than an ImportError on every rank.
    if importlib.util.find_spec(_module_name(args.benchmark)) is None:
        parser.error(
            f"benchmark {args.benchmark!r} is not available in this installation"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``moe-mpi bench`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The benchmark's exit status (0 on success).

    Raises:
        SystemExit: 2 for a missing or unknown benchmark, 0 after ``--help``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = setup_arg_parser()
    # Only the name is ours; everything after it, --help included, belongs
    # to the benchmark's own parser.
    head, rest = argv[:1], argv[1:]
    args = parse_args(parser, head, validate=lambda a: _check_installed(parser, a))
    module = importlib.import_module(_module_name(args.benchmark))
    return module.main(rest) or 0
