"""Tests for moe_mpi.launch's handling of Open MPI's session directories.

Open MPI 5's ``mpirun`` keeps a session directory, ``$TMPDIR/ompi.<pid>``,
that it removes when it ends, but not when killed with SIGKILL. A later
``mpirun`` that the kernel gives the same pid finds the stale directory and
fails before any rank runs ("The PMIx server's listener thread failed to
start"). These tests run the real ``mpirun`` with a session directory of their own
(:data:`moe_mpi.launch.TMPDIR_PARAMETER`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_mpi import launch

TIMEOUT = 60.0
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _wait_for(path: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _stale_dir_of_a_killed_mpirun(env) -> int:
    """Runs an mpirun whose rank kills it with SIGKILL; returns its pid (its directory stays)."""
    cmd = launch.mpirun_command(1, ["sh", "-c", "kill -9 $PPID"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    # mpirun forks the rank itself, so $PPID is mpirun: its pid names the directory.
    return int(next(p.name.split(".")[1] for p in launch.session_tmpdir(env).glob("ompi.*")))


def test_session_tmpdir_follows_open_mpi_rule():
    assert launch.session_tmpdir({launch.TMPDIR_PARAMETER: "/p", "TMPDIR": "/a"}) == Path("/p")
    assert launch.session_tmpdir({"TMPDIR": "/a", "TMP": "/c"}) == Path("/a")
    assert launch.session_tmpdir({"TEMP": "/b", "TMP": "/c"}) == Path("/b")
    assert launch.session_tmpdir({"TMP": "/c"}) == Path("/c")
    assert launch.session_tmpdir({"TMPDIR": ""}) == Path("/tmp")


def test_stale_session_dirs_are_those_of_processes_that_are_gone(tmp_path):
    env = {launch.TMPDIR_PARAMETER: str(tmp_path)}
    dead, alive = _dead_pid(), os.getpid()
    for name in (f"ompi.{dead}", f"prted.{dead}", f"ompi.{alive}", "ompi.notapid", "ompi.vm.0", "other.1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    (tmp_path / f"prted.{dead + 1000000}").write_text("a file, not a session directory")
    stale = [tmp_path / f"ompi.{dead}", tmp_path / f"prted.{dead}"]
    assert launch.stale_session_dirs(env) == sorted(stale)
    assert launch.remove_stale_session_dirs(env) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ompi.{alive}", "ompi.notapid", "ompi.vm.0", "other.1", f"prted.{dead + 1000000}"]
    )
    assert launch.stale_session_dirs({launch.TMPDIR_PARAMETER: str(tmp_path / "missing")}) == []


def test_a_killed_mpirun_leaves_its_session_dir_and_kill_job_removes_it(tmp_path):
    env = {**os.environ, launch.TMPDIR_PARAMETER: str(tmp_path)}
    pid = _stale_dir_of_a_killed_mpirun(env)
    assert launch.stale_session_dirs(env) == [tmp_path / f"ompi.{pid}"]
    launch.remove_stale_session_dirs(env)

    # kill_job, after SIGKILL to mpirun: its directory goes too, and every rank.
    proc = subprocess.Popen(
        launch.mpirun_command(2, ["sleep", "120"]), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(tmp_path / f"ompi.{proc.pid}")
        proc.kill()
        proc.wait()
    finally:
        launch.kill_job(proc, env)
    assert not (tmp_path / f"ompi.{proc.pid}").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.access(NS_LAST_PID, os.W_OK), reason="choosing the next pid needs root on Linux")
def test_a_stale_session_dir_stops_the_mpirun_given_its_pid_and_launch_again_clears_it(tmp_path):
    """The cause of LAUNCH_FAILURES, reproduced: the kernel is asked to give the next mpirun a stale pid."""
    env = {**os.environ, launch.TMPDIR_PARAMETER: str(tmp_path)}
    cmd = launch.mpirun_command(1, ["true"])  # asks `mpirun --version` now, not at the chosen pid
    for _ in range(20):
        pid = _stale_dir_of_a_killed_mpirun(env)
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError as e:  # root, but /proc/sys read-only (some containers)
            launch.remove_stale_session_dirs(env)
            pytest.skip(f"cannot choose the next pid: {e}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=TIMEOUT)
        if proc.pid == pid:
            break
        launch.remove_stale_session_dirs(env)  # another process took the pid first; again
    else:
        pytest.skip("no mpirun got the stale pid in 20 tries (a busy machine)")
    if proc.returncode == 0:
        pytest.skip("this Open MPI starts despite a stale session directory")
    assert launch.LAUNCH_FAILURES[0] in out + err, (proc.returncode, out, err)
    assert launch.launch_again(out + err, 1, env=env)
    assert not (tmp_path / f"ompi.{pid}").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
