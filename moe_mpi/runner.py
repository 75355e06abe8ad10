"""Running a ``moe-mpi`` command on every rank: fail together, print once.

The rule: bad input gets a clear error, printed once, and every rank exits
(non-zero, quickly). Never a hang, never a traceback from every rank, never
lost output.

Under MPI a naive ``raise`` is wrong in two ways. If every rank hits the same
bad input, every rank prints the same traceback. If only one rank hits it (a
corrupt file on one host, a missing model directory on another), that rank
exits while the others wait forever in their next collective. This module
gives commands three tools:

* :func:`parse_args`: argparse as usual, but only rank 0 prints (usage,
  errors, ``--help``); other ranks exit with the same code, quietly (unless
  rank 0's own command line was fine: then the rank says why). It reads
  the rank from the launcher's environment, so it works before MPI is
  initialised and a typo in an option never needs MPI at all.
* :func:`collective_phase`: wraps a phase that every rank runs (argument
  checks, loading the model, reading input files). Each rank catches its own
  exception; then all ranks ``allgather`` their status. If any rank failed,
  rank 0 prints one line, ``moe-mpi: error: <message>`` (the message of the
  lowest failing rank, naming the failing ranks when not all failed; with
  ``--debug`` also that rank's traceback) and every rank raises
  ``SystemExit(1)``. Other ranks print nothing.
* :func:`abort_on_error`: wraps the rest of a command (e.g. generation),
  where ranks are inside the model's all-reduces and cannot meet for an
  ``allgather``. An exception there is unexpected (all input was checked in
  collective phases); the failing rank prints its traceback once, every line
  prefixed with ``[rank r]``, and calls ``MPI_Abort`` so that every rank dies
  instead of hanging. A :class:`~moe_mpi.errors.CollectiveError`, which by
  contract is raised on every rank at the same point, is instead reported
  once by rank 0 and all ranks exit with code 1.

Which exceptions are bad input is decided in :mod:`moe_mpi.errors`
(:func:`~moe_mpi.errors.is_user_error`): those are reported as one line
without a traceback. Any other exception is a bug: its one line names the
exception type, and ``--debug`` shows the traceback.

Commands that never run under ``mpirun`` (``moe-mpi info``, ``moe-mpi
hostfile``) need none of the collective machinery: they report bad input
with :func:`fail`.

Typical use::

    def main(argv=None):
        args = parse_args(setup_arg_parser(), argv)
        comm = Communicator()
        with abort_on_error(comm, debug=args.debug):
            with collective_phase(comm, debug=args.debug):
                model, tokenizer = load(args.model, comm)
            ...  # generation: errors here abort every rank

Note: ``mpirun`` adds its own banner when ranks exit non-zero ("prterun
detected that one or more processes exited with non-zero status") or call
``MPI_Abort``; that is the launcher's, not part of the error message.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, TextIO, Union

from .errors import CollectiveError, is_user_error

__all__ = [
    "ARGPARSE_GRACE_SECONDS",
    "PROG",
    "abort_on_error",
    "add_debug_argument",
    "collective_phase",
    "env_rank",
    "fail",
    "format_error",
    "parse_args",
    "print_error",
    "say",
]

#: Program name used in messages.
PROG = "moe-mpi"


def format_error(exc: BaseException) -> str:
    """The one-line message for ``exc``.

    User errors give their message (``OSError`` as ``strerror: filename``);
    anything else is prefixed with its type, since it is a bug and the type
    is the first thing to know about it.
    """
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # "[Errno 2] No such file or directory: 'x'" -> plainer wording.
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc).strip()
    message = " ".join(message.splitlines()) or type(exc).__name__
    if not is_user_error(exc):
        message = f"{type(exc).__name__}: {message}"
    return message


# How long ranks other than 0 wait on a command-line error (see parse_args).
ARGPARSE_GRACE_SECONDS = 10.0


def env_rank() -> int:
    """This process's rank as told by the launcher's environment, else 0.

    Works before MPI is initialised (Open MPI, PMIx and MPICH/Hydra set these).
    """
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def under_launcher() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec) started this process."""
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"))


def show_progress(choice: Optional[bool] = None) -> bool:
    """Whether this process draws progress bars: ``choice`` if given, else on
    rank 0 when stderr is a terminal or a launcher forwards it (mpirun gives
    the ranks pipes, not the user's terminal)."""
    if choice is not None:
        return choice and env_rank() == 0
    return env_rank() == 0 and (sys.stderr.isatty() or under_launcher())


def print_error(message: str, *, prefix: str = "") -> None:
    """Writes ``<prefix>moe-mpi: error: <message>`` to stderr and flushes."""
    sys.stderr.write(f"{prefix}{PROG}: error: {message}\n")
    sys.stderr.flush()


def say(text: str, stream: TextIO) -> None:
    """Writes ``text`` and a newline to ``stream`` on rank 0 only, and flushes.

    For output that every rank would otherwise print (help, usage) before
    MPI is initialised: the rank comes from :func:`env_rank`.
    """
    if env_rank() == 0:
        stream.write(text + "\n")
        stream.flush()


def fail(message: Union[str, BaseException]) -> NoReturn:
    """Reports bad input as one ``moe-mpi: error:`` line and exits with code 1.

    For commands that run in one process (``info``, ``hostfile``): no
    traceback, since bad input is not a bug. An exception is worded by
    :func:`format_error`.

    Raises:
        SystemExit: Always, with code 1.
    """
    if isinstance(message, BaseException):
        message = format_error(message)
    print_error(message)
    raise SystemExit(1)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--debug`` flag that the error handlers honour."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="On errors, also print the Python traceback.",
    )


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
    validate: Optional[Callable[[argparse.Namespace], None]] = None,
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, printing on rank 0 only.

    Every rank parses the same command line, so every rank reaches the same
    result; ranks other than 0 parse with stdout and stderr silenced and exit
    (``SystemExit``, code 2 for errors, 0 for ``--help``) without a word.
    Only when a rank's command line fails where rank 0's did not (mpirun's
    ``:`` gives ranks their own) does that rank print its error line, prefixed
    ``[rank r]``, after :data:`ARGPARSE_GRACE_SECONDS`.

    Args:
        parser: The command's parser.
        argv: Arguments (default ``sys.argv[1:]``).
        validate: Optional checks across options, run on the parsed
            namespace under the same silencing; report problems with
            ``parser.error(...)``.
    """

    def parse() -> argparse.Namespace:
        args = parser.parse_args(argv)
        if validate is not None:
            validate(args)
        return args

    if env_rank() == 0:
        return parse()
    captured = io.StringIO()
    with open(os.devnull, "w") as devnull:
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(captured):
            try:
                return parse()
            except SystemExit as e:
                if not e.code:
                    raise
                exit_code = e.code
    # mpirun ends the job at the first non-zero exit: if this rank went
    # first, rank 0 could be killed before its usage message is written.
    # Rank 0 fails the same way and exits at once, which ends this rank too.
    time.sleep(ARGPARSE_GRACE_SECONDS)
    # Still here: rank 0 took its command line (mpirun's ':' gives ranks
    # their own), so nobody has reported this one's error. Say it, once.
    lines = [line for line in captured.getvalue().splitlines() if line.strip()]
    if lines:
        sys.stderr.write(f"[rank {env_rank()}] {lines[-1]}\n")
        sys.stderr.flush()
    raise SystemExit(exit_code)


def _rank(comm) -> int:
    return 0 if comm is None else comm.rank


def _size(comm) -> int:
    return 1 if comm is None else comm.size


def _describe(exc: BaseException, debug: bool) -> Dict[str, Any]:
    """This rank's failure, as a msgpack-friendly dict for the allgather."""
    return {
        "message": format_error(exc),
        "user": is_user_error(exc),
        "traceback": "".join(traceback.format_exception(exc)) if debug else None,
    }


def _ranks_text(ranks: List[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(r) for r in ranks)


def _report(failed: List[tuple], size: int, debug: bool, name_ranks: bool) -> None:
    """Rank 0 prints the lowest failing rank's error (once)."""
    first = failed[0][1]
    message = first["message"]
    if name_ranks and len(failed) < size:
        # Only some ranks failed: say which, since on several hosts that
        # points at the host whose file or directory is different.
        message += f" (on {_ranks_text([r for r, _ in failed])} of {size})"
    if not first["user"] and not debug:
        message += " (run with --debug for the traceback)"
    if debug and first["traceback"]:
        sys.stderr.write(first["traceback"])
    print_error(message)


@contextlib.contextmanager
def collective_phase(
    comm, *, debug: bool = False, name_ranks: bool = True
) -> Iterator[None]:
    """A phase that every rank runs; an error on any rank ends all of them.

    Use as a context manager (or a decorator). Every rank of ``comm`` must
    enter and leave the phase; inside it, a rank may fail on its own (e.g.
    only rank 1 cannot read its copy of a file). On the way out, all ranks
    ``allgather`` their status. If any failed, rank 0 prints one line,
    ``moe-mpi: error: <message of the lowest failing rank>`` (with ``debug``,
    that rank's traceback first), and every rank raises ``SystemExit(1)``.

    Collectives inside the phase are allowed only where every rank is sure
    to reach them (e.g. a ``bcast`` after a rank-0-only step belongs *after*
    the phase, so that a rank-0 failure cannot strand the others in it).

    Args:
        comm: A :class:`moe_mpi.Communicator`, or ``None`` for a process
            that is alone (no MPI).
        debug: Print the failing rank's traceback too.
        name_ranks: When only some ranks fail, say which (``(on rank 1 of
            2)``). Turn off for phases where only rank 0 does anything.

    Raises:
        SystemExit: With code 1 on every rank if any rank failed.
    """
    failure = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        # Deliberately every exception, not only user errors: a rank that
        # left the phase with a raw exception would skip the allgather below
        # and leave the other ranks waiting in it forever. It is reported
        # (with its type, as a bug) and turned into SystemExit(1) below.
        failure = _describe(exc, debug)
    statuses = [failure] if _size(comm) == 1 else comm.allgather(failure)
    failed = [(rank, s) for rank, s in enumerate(statuses) if s is not None]
    if not failed:
        return
    if _rank(comm) == 0:
        _report(failed, len(statuses), debug, name_ranks)
    if _size(comm) > 1:
        # mpirun tears the job down at the first non-zero exit; wait until
        # rank 0's message is written before anyone exits.
        comm.barrier()
    raise SystemExit(1)


def _write_prefixed(text: str, prefix: str) -> None:
    sys.stderr.write("".join(prefix + line for line in text.splitlines(True)))
    sys.stderr.flush()


@contextlib.contextmanager
def abort_on_error(comm, *, debug: bool = False) -> Iterator[None]:
    """Outside collective phases: any error ends every rank, reported once.

    * :class:`CollectiveError` (raised on every rank at the same point): rank 0
      prints it, every rank raises ``SystemExit(1)``.
    * Any other exception happened on this rank and the others cannot know:
      they may be blocked in a collective waiting for this rank. It prints
      ``[rank r] moe-mpi: error: ...`` (a user error) or its traceback with
      every line prefixed ``[rank r]`` (a bug, always with traceback), then
      calls ``comm.abort(1)`` (``MPI_Abort``), which kills every rank.
      If several ranks fail at once each may print before the abort lands;
      that is why all input is checked in :func:`collective_phase` first.
    * ``KeyboardInterrupt``: exit code 130 without a traceback (aborting
      the job when there are other ranks).
    * ``BrokenPipeError`` on stdout (``moe-mpi generate ... | head``): the
      reader is gone; end quietly (aborting the job when there are other
      ranks).

    On a single rank nothing needs aborting: the message is printed and the
    process exits with code 1.
    """
    rank, size = _rank(comm), _size(comm)
    prefix = f"[rank {rank}] " if size > 1 else ""
    try:
        yield
    except CollectiveError as exc:
        if rank == 0:
            if debug:
                traceback.print_exc()
            print_error(format_error(exc))
        if size > 1:
            comm.barrier()  # rank 0's message first, then exits (see above)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if rank == 0:
            sys.stderr.write(f"\n{PROG}: interrupted\n")
        _end(comm, 130)
    except BrokenPipeError:
        # Nobody reads stdout any more; point it at /dev/null so the
        # interpreter's final flush does not raise again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        _end(comm, 1)
    except Exception as exc:  # noqa: BLE001
        # Deliberately every exception: whatever it is, only this rank knows
        # about it, and the other ranks may be waiting for this one inside a
        # collective. MPI_Abort (in _end) is the only way to end them all.
        if is_user_error(exc) and not debug:
            print_error(format_error(exc), prefix=prefix)
        else:
            _write_prefixed(traceback.format_exc(), prefix)
        _end(comm, 1)


def _end(comm, code: int) -> None:
    """Ends this process, and the whole job when there are other ranks."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if _size(comm) > 1:
        comm.abort(code)  # never returns
    raise SystemExit(code)
