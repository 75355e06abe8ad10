"""``moe-mpi serve`` jobs in the serve tests: started under ``mpirun``, and checked gone."""

import os
import signal
import sys
import time
from pathlib import Path

from moe_mpi.bench.serve import ServerJob
from moe_mpi.launch import mpirun_command

#: Offline, and no tokenizer threads: what every served test job runs with.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def serve_argv(n: int, ckpt, *extra) -> list:
    """``mpirun -n N ... moe-mpi serve --model CKPT --port 0 EXTRA``."""
    return mpirun_command(n, [sys.executable, "-m", "moe_mpi", "serve", "--model", str(ckpt), "--port", "0", *map(str, extra)])


def start_server(n: int, ckpt, tmp: Path, *extra, timeout: float = 120) -> ServerJob:
    """A started server on ``n`` ranks, ready for requests (killed if it never gets ready)."""
    job = ServerJob(serve_argv(n, ckpt, *extra), tmp / f"serve-{n}-{time.monotonic_ns()}.log", env=ENV).start()
    try:
        job.wait_ready(timeout=timeout)
    except RuntimeError:
        job.stop(signal.SIGKILL, timeout=5)
        raise
    return job


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def ranks_gone(pids, within: float) -> bool:
    """Whether every process of ``pids`` has ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False
