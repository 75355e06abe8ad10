"""Test-run set-up: a temporary directory of the run's own for every job.

Open MPI puts a session directory named by mpirun's pid (``ompi.<pid>``) in
``TMPDIR``. Several tests kill a job with SIGKILL on purpose, which leaves that
directory behind, and a later ``mpirun`` that gets the same pid then fails to
start (see :data:`moe_mpi.launch.LAUNCH_FAILURES`). So every job of the run
gets a fresh ``TMPDIR`` that directories left by other runs on this machine
cannot reach, and what a test leaves there is removed after it.
"""

import os
import shutil
import tempfile

import pytest

from moe_mpi.launch import remove_stale_session_dirs

_OWN_TMPDIR = None


def pytest_configure(config):
    global _OWN_TMPDIR
    # Made (and tempfile's default fixed) before TMPDIR changes: pytest's own
    # tmp_path stays where it was; the jobs the tests start use the new one.
    _OWN_TMPDIR = tempfile.mkdtemp(prefix="moe-mpi-tests-")
    os.environ["TMPDIR"] = _OWN_TMPDIR


def pytest_unconfigure(config):
    if _OWN_TMPDIR is not None:
        shutil.rmtree(_OWN_TMPDIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_stale_mpi_session_dirs():
    yield
    remove_stale_session_dirs()
