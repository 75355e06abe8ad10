"""The ``moe-mpi`` command: ``moe-mpi <command> [options]``.

As with ``mlx_lm``, each command is a module ``moe_mpi.<command>`` (or a
package with its own ``main``) exposing ``setup_arg_parser()`` and
``main(argv=None)``; it is imported only when it runs, so ``moe-mpi --help``
stays fast and one command's imports never slow down another. Run a command
on several ranks with ``mpirun -n N moe-mpi <command> ...``; every rank runs
the same command line.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from .runner import PROG, env_rank, say

#: Command name -> one-line description (shown by ``moe-mpi --help``).
SUBCOMMANDS = {
    "generate": "Generate text with an MoE model, experts spread over the MPI ranks.",
    "serve": "Serve an MoE model over an OpenAI-compatible HTTP API, with continuous batching.",
    "profile": "Record router statistics over a prompts file, for balancing the experts.",
    "info": "Show what each rank will hold (experts, bytes), without launching anything.",
    "hostfile": "Check and convert MPI hostfiles (Open MPI, MPICH, mlx.launch JSON).",
    "calibrate": "Measure this cluster's bandwidth, kernel rates and link costs into a profile (under mpirun).",
    "plan": "Predict tokens/s and memory per mode and machine count: will another Mac help?",
    "bench": "Benchmarks of expert-parallel inference (collectives, ping-pong, models).",
}

#: Commands that need no mpirun. Started under one anyway, rank 0 alone runs
#: them, so the answer is printed (and its files written) once.
LOCAL_COMMANDS = ("info", "hostfile", "plan")


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        f"usage: {PROG} <command> [options]",
        "",
        "Expert-parallel Mixture-of-Experts inference for MLX over MPI.",
        "Run on N ranks with: mpirun -n N " + PROG + " <command> ...",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this help message and exit",
        "  --version      show the version and exit",
        "",
        f"Run '{PROG} <command> --help' for the options of a command.",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Dispatches ``argv`` (default ``sys.argv[1:]``) to a command's ``main``.

    Raises:
        SystemExit: 0 after ``--help``/``--version``, 2 for a missing or
            unknown command, or whatever the command exits with.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        say(_usage(), sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        say(_usage(), sys.stdout)
        raise SystemExit(0)
    if command == "--version":
        from . import __version__

        say(f"{PROG} {__version__}", sys.stdout)
        raise SystemExit(0)
    if command not in SUBCOMMANDS:
        say(
            f"{PROG}: error: unknown command {command!r} "
            f"(choose from {', '.join(SUBCOMMANDS)})",
            sys.stderr,
        )
        raise SystemExit(2)
    if command in LOCAL_COMMANDS and env_rank() != 0:
        raise SystemExit(0)
    module_name = f"{__package__ or 'moe_mpi'}.{command}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the command exists but one of its imports is missing
        say(f"{PROG}: error: command {command!r} is not installed", sys.stderr)
        raise SystemExit(2) from None
    code = module.main(rest)
    if code:  # a command may return an exit status instead of raising
        raise SystemExit(code)


if __name__ == "__main__":
    main()
