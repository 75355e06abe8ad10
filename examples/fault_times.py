"""Measures how long each fault of docs/reliability.md takes to end a job.

Runs ``moe-mpi generate`` on 3 ranks (on this machine) with a tiny synthetic
model whose generation runs to ``--max-tokens``, and for each fault prints the
seconds from the fault to mpirun's exit, the exit status, and the message::

    python examples/fault_times.py [--timeout 3]

Uses tests/test_faults.py's job helper (Linux: it finds ranks in /proc).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_faults import Job, generate_argv  # noqa: E402

from moe_mpi import synthetic  # noqa: E402
from moe_mpi.launch import mpirun_command  # noqa: E402


def endless_checkpoint(root: Path) -> Path:
    path = synthetic.write_checkpoint(root / "model", "qwen3_moe", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [config["vocab_size"] + 7]
    (path / "config.json").write_text(json.dumps(config))
    return path


def measure(ckpt: Path, sig: int, timeout: float) -> None:
    job = Job(mpirun_command(3, generate_argv("--model", ckpt, "--max-tokens", 100000, "--timeout", timeout)))
    victim = job.rank_pid(2)
    job.wait_for_stdout()
    os.kill(victim, sig)
    hit = time.monotonic()
    job.proc.wait(timeout=timeout + 60)
    took = time.monotonic() - hit
    left = job.members()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    lines = [line for line in job.err.splitlines() if "error" in line or "noticed" in line or "signal" in line]
    print(f"{signal.Signals(sig).name} on rank 2: job ended after {took:.2f} s, exit {job.proc.returncode}, "
          f"{len(left)} processes left; {' / '.join(lines)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    try:
        ckpt = endless_checkpoint(root)
        measure(ckpt, signal.SIGKILL, args.timeout)
        measure(ckpt, signal.SIGSTOP, args.timeout)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
