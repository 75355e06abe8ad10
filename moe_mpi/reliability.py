"""What ``moe-mpi generate`` and ``moe-mpi serve`` share to fail together, and loudly.

Both commands run the same start-up and the same checks (docs/reliability.md):

* the options ``--timeout``, ``--routing-guard`` / ``--no-routing-guard`` and
  ``--strict-routing`` (:func:`add_reliability_arguments`), the all-reduce's
  data path ``--backend`` and ``--overlap`` (:func:`add_data_path_arguments`,
  :func:`backend_comm`) and the rules between them
  (:func:`check_reliability_arguments`);
* :func:`watched`: the fingerprint of the command line, compared as the
  first collective (:mod:`moe_mpi.fingerprint`), then the watchdog
  (:mod:`moe_mpi.watchdog`) for the rest of the run, which ends with a
  watched barrier;
* :func:`load_checked`: this rank's shard loaded as busy work (the others
  wait for a slow disk while this rank answers heartbeats), the model's
  fingerprint compared, and the routing guard (:mod:`moe_mpi.guard`)
  installed;
* :func:`guard_warning`: what to tell the user when the guard repaired layers.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .argtypes import timeout_seconds
from .comm import BACKENDS, Communicator
from .errors import UserError
from .runner import collective_phase
from .watchdog import DEFAULT_TIMEOUT, Watchdog

__all__ = [
    "add_data_path_arguments",
    "add_reliability_arguments",
    "backend_comm",
    "check_reliability_arguments",
    "guard_wanted",
    "guard_warning",
    "load_checked",
    "watched",
]


def add_reliability_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--routing-guard`` / ``--no-routing-guard``, ``--strict-routing`` and ``--timeout``."""
    parser.add_argument(
        "--routing-guard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "Check in every MoE layer's all-reduce that all ranks chose the same experts, and redo a "
            "layer where they did not with rank 0's routing (docs/reliability.md). Default: on, "
            "except with --backend mlx, which cannot carry the check."
        ),
    )
    parser.add_argument(
        "--strict-routing",
        action="store_true",
        help="A routing divergence between ranks is an error that ends the job instead of being repaired.",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=(
            "End the job, naming the rank at fault, when an MPI operation has waited this long "
            "for the other ranks: a frozen Mac, a stopped process, a cut link (docs/reliability.md). "
            f"0 waits for ever (default: {DEFAULT_TIMEOUT:g})."
        ),
    )


def add_data_path_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--backend`` and ``--overlap``: how the per-layer all-reduce travels."""
    parser.add_argument("--backend", choices=BACKENDS, default="mpi4py",
                        help="Data path of the per-layer all-reduce (default: mpi4py).")
    parser.add_argument(
        "--overlap", action="store_true",
        help=(
            "Two-batch overlap: the sequences in two cohorts stepped in turns, each one's all-reduces "
            "travelling while the other computes. Pays over slow links; costs expert reads where decode "
            "is bound by memory (docs/serving.md, 'Overlap'). Needs --backend mpi4py."
        ),
    )


def backend_comm(comm: Communicator, backend: str) -> Communicator:
    """The job's communicator with ``--backend``'s data path (``comm`` itself if it has it)."""
    if backend == comm.backend:
        return comm
    try:
        return Communicator(backend=backend)
    except RuntimeError as e:  # MLX cannot share this MPI world: a setup problem
        raise UserError(f"--backend {backend}: {e}") from None


def check_reliability_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses guard and overlap options that ``--backend`` cannot honour (``parser.error``)."""
    if getattr(args, "overlap", False) and args.backend != "mpi4py":
        parser.error(f"--overlap needs --backend mpi4py (non-blocking all-reduces), not --backend {args.backend}")
    if args.routing_guard and args.backend == "mlx":
        parser.error("--routing-guard needs --backend mpi4py (MLX's all-reduce cannot carry the check)")
    if args.strict_routing and (args.routing_guard is False or args.backend == "mlx"):
        parser.error("--strict-routing needs the routing guard (--backend mpi4py, no --no-routing-guard)")


def guard_wanted(args: argparse.Namespace) -> bool:
    """Whether the routing guard is on: by default, wherever the backend can carry it."""
    return args.routing_guard is not False and args.backend == "mpi4py"


@contextlib.contextmanager
def watched(comm, args: argparse.Namespace, per_host: Optional[Dict[str, Any]] = None) -> Iterator[Watchdog]:
    """The run of a command under the watchdog; collective, entered right after ``Communicator()``.

    Compares the command line's fingerprint first (ranks started with
    different options or versions would not even run the same collectives
    after it), then exchanges the watchdog's heartbeat addresses and starts
    it. On a normal exit every rank meets in a barrier, which the watchdog
    still watches: a rank that froze near the end would otherwise hang the
    others in ``MPI_Finalize``, where nothing watches.

    Args:
        comm: The job's :class:`moe_mpi.Communicator`.
        args: The parsed command line (``timeout``, ``debug``, ...).
        per_host: The command's own rules for :func:`moe_mpi.fingerprint.run_fields`.

    Yields:
        This rank's running :class:`~moe_mpi.watchdog.Watchdog`.
    """
    from .fingerprint import compare, run_fields

    compare(comm, run_fields(args, per_host), "how to run")
    watchdog = Watchdog(comm, args.timeout)
    with collective_phase(comm, debug=args.debug, name_ranks=False):
        watchdog.exchange()
    watchdog.start()
    try:
        yield watchdog
        comm.barrier()
    finally:
        watchdog.stop()


def load_checked(
    args: argparse.Namespace, comm, watchdog: Watchdog, load: Callable[[], Tuple[Any, Any, Dict]]
) -> Tuple[Any, Any, Dict]:
    """Loads this rank's shard with ``load()``, then checks that every rank loaded the same model (collective).

    Loading and hashing the model run as busy work (:meth:`Watchdog.busy`).
    Then the routing guard is installed unless ``args`` turn it off.

    Args:
        args: The parsed command line (``model``, ``debug``, the guard options).
        comm: The job's communicator (of ``args.backend``).
        watchdog: This rank's watchdog.
        load: Returns ``(model, tokenizer, config)`` of this rank.

    Returns:
        What ``load`` returned; the model has ``model.routing_guard`` (or None).

    Raises:
        CollectiveError: The ranks loaded different models (on every rank).
    """
    from .fingerprint import compare, model_fields
    from .loading import resolve_model_path

    with collective_phase(comm, debug=args.debug):
        with watchdog.busy():
            model, tokenizer, config = load()
            # No --model: resolve_model_path gives the bundled demo model.
            fields = model_fields(resolve_model_path(args.model), config, model)
    compare(comm, fields, "the model they loaded")
    model.routing_guard = None
    if guard_wanted(args):
        from .guard import guard_routing

        model.routing_guard = guard_routing(model, strict=args.strict_routing)
    return model, tokenizer, config


def guard_warning(guard) -> Optional[str]:
    """The warning about the routing guard's repairs so far, or None if it never repaired."""
    if guard is None or not guard.repairs:
        return None
    layer, ranks, tokens = guard.events[0]
    return (
        f"the ranks' routing diverged in {guard.repairs} MoE layer call(s) (first: layer {layer}, ranks "
        f"{', '.join(map(str, ranks))} differed from rank 0 on {tokens} token(s)); each was redone with "
        "rank 0's routing. Ranks on different hardware or software round near-ties differently."
    )
