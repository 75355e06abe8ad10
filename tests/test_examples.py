"""The measurement scripts in ``examples/`` that the docs cite still run.

``decode_phases.py`` and ``decode_ceiling.py`` run under real ``mpirun`` on
2 ranks with the ``tiny`` synthetic model (or its shapes);
``decode_compile.py`` needs no model. Only the shape of the
output is checked: these are measurements, and speed is not asserted.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_mpi import launch

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 150.0
PHASES = ["rms norms", "rope", "kv cache", "sdpa", "dense proj", "experts", "all-reduce", "other"]


@pytest.mark.parametrize("extra", [[], ["--mode", "sliced", "--mlx-norms"]])
def test_decode_phases_prints_every_phase_of_every_rank(tmp_path, extra):
    argv = [sys.executable, "examples/decode_phases.py", "--synthetic", "tiny", "--cache-dir", str(tmp_path), *extra]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"plain step [\d.]+ ms", out), out
    rows = {}
    for line in out.splitlines():
        for phase in PHASES:
            if line.startswith(phase + " "):
                rows[phase] = [float(v) for v in line[len(phase):].split()]
    assert list(rows) == PHASES, out
    assert all(len(v) == 2 for v in rows.values()), out  # one column per rank
    # Every MoE layer ran its experts and its all-reduce on both ranks.
    assert all(v > 0 for v in rows["experts"] + rows["all-reduce"]), out
    assert ("MLX norms and RoPE" in out) == ("--mlx-norms" in extra)


def test_decode_compile_prints_eager_and_compiled_times():
    proc = subprocess.run(
        [sys.executable, "examples/decode_compile.py"], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for segment in ("router", "combine", "attention", "residual + norm"):
        assert re.search(rf"^{re.escape(segment)}\s+[\d.]+\s+[\d.]+\s+saves", proc.stdout, re.M), proc.stdout
    assert "numpy norms and RoPE (moe_mpi)" in proc.stdout


def test_decode_ceiling_prints_every_kernel_against_the_limit():
    argv = [sys.executable, "examples/decode_ceiling.py", "--synthetic", "tiny"]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("# 2 ranks, tiny shapes") == 1, out  # rank 0 prints
    assert re.search(r"STREAM triad [\d.]+ before, [\d.]+ after -> [\d.]+ GB/s per rank; ep limit [\d.]+ tok/s", out), out
    for kernel in ("gemv", "sgemv", "read"):
        assert re.search(rf"^\s*{kernel} ceiling: +[\d.]+ ms/step = +[\d.]+ tok/s = +\d+% of the limit$", out, re.M), out
