"""Tests for moe_mpi.comm (run under real mpirun) and moe_mpi.launch.

The rank-side code lives in tests/mpi_comm_checks.py; each test here launches
it with ``mpirun -n N python -m mpi4py`` and checks that every rank reported
every check as passed. The pytest process itself never initialises MPI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_mpi import launch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHECK_SCRIPT = TESTS / "mpi_comm_checks.py"
TIMEOUT = 120.0  # a hang fails the test instead of blocking the suite


def _load_checks_module():
    spec = importlib.util.spec_from_file_location("mpi_comm_checks", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports mlx, not mpi4py.MPI
    return module


CHECKS = _load_checks_module()
ALL_CHECKS = sorted(set(CHECKS.CHECKS) - CHECKS.SPECIAL)


def _run(n: int, args: list[str], *, module_mpi4py: bool = True):
    argv = [sys.executable]
    if module_mpi4py:
        # Abort every rank on an uncaught exception in any rank.
        argv += ["-m", "mpi4py"]
    argv += [str(CHECK_SCRIPT), *args]
    return launch.run_mpirun(n, argv, timeout=TIMEOUT, cwd=REPO)


def _assert_all_ok(proc, n: int, names: list[str]) -> None:
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    ok = set(re.findall(r"^OK (\S+) rank=(\d+) size=(\d+)$", proc.stdout, re.M))
    missing = [
        (name, rank)
        for name in names
        for rank in range(n)
        if (name, str(rank), str(n)) not in ok
    ]
    assert not missing, f"checks not reported OK: {missing}\n{output}"


@pytest.mark.parametrize("backend", ["mpi4py", "mlx"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_comm_checks(n, backend):
    """all_sum (float32/float16/bfloat16/int32, shapes, views), bcast,
    allgather, counters and the size-1 path, on n ranks with each backend."""
    proc = _run(n, ["--backend", backend, "all"])
    _assert_all_ok(proc, n, ALL_CHECKS)


def test_comm_checks_without_mpirun():
    """A plain `python script.py` is a size-1 MPI world (singleton init)."""
    proc = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), "all"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
    )
    _assert_all_ok(proc, 1, ALL_CHECKS)


@pytest.mark.parametrize("n", [1, 2])
def test_mlx_backend_refused_after_mpi4py_init(n):
    """If mpi4py initialised MPI first, backend='mlx' raises a clear error."""
    proc = _run(n, ["mlx_after_mpi4py_init"])
    _assert_all_ok(proc, n, ["mlx_after_mpi4py_init"])


def test_mlx_initialised_mpi_first():
    """An earlier mx.distributed.init() is reused by both backends."""
    proc = _run(2, ["mlx_initialised_first"])
    _assert_all_ok(proc, 2, ["mlx_initialised_first"])


@pytest.mark.parametrize("module_mpi4py", [True, False], ids=["m_mpi4py", "plain"])
def test_failure_on_one_rank_aborts_job(module_mpi4py):
    """An exception on one rank ends the job (no hang, non-zero exit)."""
    proc = _run(3, ["fail_on_last_rank"], module_mpi4py=module_mpi4py)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "deliberate failure" in proc.stderr


# ----------------------------------------------------------------- launch.py


def _fake_mpirun(directory: Path, version_text: str) -> Path:
    path = directory / "mpirun"
    path.write_text(f"#!/bin/sh\necho '{version_text}'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_mpirun_command_prefers_mpirun_next_to_python(tmp_path, monkeypatch):
    fake = _fake_mpirun(tmp_path, "mpirun (Open MPI) 5.0.0")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cmd = launch.mpirun_command(
        3, ["python", "x.py", "--flag"], extra=["--bind-to", "none"]
    )
    assert cmd == [
        str(fake),
        "-n",
        "3",
        "--oversubscribe",
        "--allow-run-as-root",
        "--bind-to",
        "none",
        "python",
        "x.py",
        "--flag",
    ]


def test_mpirun_command_flags(tmp_path, monkeypatch):
    fake = _fake_mpirun(tmp_path, "mpirun (Open MPI) 5.0.0")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cmd = launch.mpirun_command(2, ["prog"], oversubscribe=False)
    assert cmd == [str(fake), "-n", "2", "prog"]
    with pytest.raises(ValueError):
        launch.mpirun_command(0, ["prog"])


def test_mpirun_command_non_open_mpi(tmp_path, monkeypatch):
    # MPICH's hydra has neither --oversubscribe nor --allow-run-as-root.
    fake = _fake_mpirun(tmp_path, "HYDRA build details: Version: 4.2.0")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert launch.mpirun_command(2, ["prog"]) == [str(fake), "-n", "2", "prog"]


def test_mpirun_command_falls_back_to_path(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = _fake_mpirun(bindir, "mpirun (Open MPI) 5.0.0")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(bindir))
    assert launch.find_mpirun() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        launch.find_mpirun()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_run_mpirun_timeout_kills_every_rank():
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(300)"
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        launch.run_mpirun(2, [sys.executable, "-c", code], timeout=10.0)
    assert time.monotonic() - start < 60
    pids = [int(p) for p in re.findall(r"^\d+$", info.value.output or "", re.M)]
    assert pids, f"ranks did not start within the timeout: {info.value.output!r}"
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.2)
    assert not pids, f"ranks still running after timeout: {pids}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _flaky_mpirun(directory: Path, failures: int, message: str) -> Path:
    """An mpirun that fails its first ``failures`` launches with ``message``, then runs its argv."""
    count = directory / "launches"
    path = directory / "mpirun"
    path.write_text(
        "#!/bin/sh\n"
        "case \"$1\" in --version) echo 'mpirun (Open MPI) 5.0.0'; exit 0;; esac\n"
        f"n=$(cat '{count}' 2>/dev/null || echo 0); n=$((n + 1)); echo $n > '{count}'\n"
        f"if [ $n -le {failures} ]; then echo \"{message}\" >&2; exit 1; fi\n"
        "shift 2; while [ \"${1#-}\" != \"$1\" ]; do shift; done; exec \"$@\"\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return count


@pytest.mark.parametrize("failures, launches, returncode", [(1, 2, 0), (2, 3, 0), (3, 3, 1)])
def test_run_mpirun_launches_again_when_mpirun_fails_to_start(tmp_path, monkeypatch, failures, launches, returncode):
    # Only a launcher failure before any rank ran is retried, at most LAUNCH_ATTEMPTS launches.
    assert launch.LAUNCH_ATTEMPTS == 3
    count = _flaky_mpirun(tmp_path, failures, launch.LAUNCH_FAILURES[0])
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    proc = launch.run_mpirun(1, ["echo", "ran"], timeout=30)
    assert int(count.read_text()) == launches
    assert proc.returncode == returncode
    assert ("ran" in proc.stdout) == (returncode == 0)


def test_run_mpirun_does_not_repeat_a_program_that_failed(tmp_path, monkeypatch):
    # A failure of the program itself (or any other message) is returned at once.
    count = _flaky_mpirun(tmp_path, 1, "rank 1 exited with status 1")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    proc = launch.run_mpirun(1, ["echo", "ran"], timeout=30)
    assert int(count.read_text()) == 1
    assert proc.returncode == 1
    with pytest.raises(ValueError):
        launch.run_mpirun(1, ["echo"], attempts=0)


@pytest.mark.parametrize("failures, ready", [(2, True), (3, False)])
def test_server_job_launches_again_when_mpirun_fails_to_start(tmp_path, failures, ready):
    # bench serve's and the serve tests' job: the same rule as run_mpirun's.
    from moe_mpi.bench.serve import ServerJob

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
        f"h.HTTPServer(('127.0.0.1', {free}), H).serve_forever()\n"
    )
    count = tmp_path / "launches"
    script = tmp_path / "job"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat '{count}' 2>/dev/null || echo 0); n=$((n + 1)); echo $n > '{count}'\n"
        f"if [ $n -le {failures} ]; then echo \"{launch.LAUNCH_FAILURES[0]}\"; exit 213; fi\n"
        f"exec '{sys.executable}' -c \"$1\"\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    job = ServerJob([script, server], tmp_path / "job.log", url=f"http://127.0.0.1:{free}").start()
    try:
        if ready:
            assert job.wait_ready(timeout=60) == f"http://127.0.0.1:{free}"
        else:
            with pytest.raises(RuntimeError, match="exited with code 213"):
                job.wait_ready(timeout=60)
        assert int(count.read_text()) == min(failures + 1, launch.LAUNCH_ATTEMPTS)
    finally:
        job.stop()


@pytest.mark.parametrize("mode", ["ep", "auto"])
def test_mlx_collectives_run_one_at_a_time_across_streams(mode, tmp_path):
    """Lazy all-reduces made on mlx-lm's generation stream and on the default stream
    do not overlap: every collective runs on moe_mpi's one collective stream. (Before,
    this run ended in MPI_ERR_TRUNCATE within 300 rounds in each of 4 runs, ep and auto.)"""
    from moe_mpi import synthetic

    ckpt = synthetic.write_checkpoint(tmp_path / "q4", synthetic.tiny_config("qwen3_moe"), seed=1, quantize=4)
    argv = [sys.executable, "-m", "mpi4py", str(TESTS / "mpi_stream_race.py"), str(ckpt), mode, "300"]
    proc = launch.run_mpirun(3, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok "), proc.stdout
