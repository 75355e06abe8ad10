"""Test-run set-up: a temporary directory of the run's own for every job.

Open MPI puts a session directory named by mpirun's pid (``ompi.<pid>``) in
``/tmp``. Several tests kill a job with SIGKILL on purpose, which leaves that
directory behind, and a later ``mpirun`` that gets the same pid then fails to
start (see :data:`moe_mpi.launch.LAUNCH_FAILURES`). So the run's jobs keep
their session directories in a fresh directory of the run's own, which those
left by other runs on this machine cannot reach, and what a test leaves there
is removed after it. Only Open MPI's directories move: ``TMPDIR`` is left
alone.
"""

import os
import shutil
import tempfile

import pytest

from moe_mpi.launch import TMPDIR_PARAMETER, remove_stale_session_dirs

_OWN_TMPDIR = None


def pytest_configure(config):
    global _OWN_TMPDIR
    _OWN_TMPDIR = tempfile.mkdtemp(prefix="moe-mpi-tests-")
    os.environ[TMPDIR_PARAMETER] = _OWN_TMPDIR  # passed on to every job the tests start


def pytest_unconfigure(config):
    if _OWN_TMPDIR is not None:
        shutil.rmtree(_OWN_TMPDIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_stale_mpi_session_dirs():
    yield
    remove_stale_session_dirs()
