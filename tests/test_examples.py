"""The measurement scripts in ``examples/`` that the docs cite still run.

``decode_phases.py`` and ``decode_ceiling.py`` run under real ``mpirun`` on
2 ranks with the ``tiny`` synthetic model (or its shapes);
``decode_compile.py`` needs no model; ``link_sweep.py`` reads the committed
results of the link sweep. Only the shape of the output is checked: these
are measurements, and speed is not asserted. ``fault_times.py`` (3 ranks)
must report both faults ending the job.
"""

import importlib.util
import math
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
    assert re.search(r"read-only [\d.]+ before, [\d.]+ after -> [\d.]+ GB/s per rank; ep limit at that", out), out
    for kernel in ("gemv", "sgemv", "read", "layer"):
        assert re.search(rf"^\s*{kernel} ceiling: +[\d.]+ ms/step = +[\d.]+ tok/s = +\d+% of the limit, +\d+% of the read-only one$",
                         out, re.M), out


def _link_sweep():
    spec = importlib.util.spec_from_file_location("link_sweep", REPO / "examples" / "link_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_link_sweep_fit_recovers_all_reduces_per_step():
    """The fit's slope is the number of all-reduce times a step pays (8 and 16 here by construction)."""
    rows = [dict(mode=mode, batch=1, allreduce_us=us, step_ms=40.0 + n * us / 1000)
            for mode, n in (("ep", 8), ("mlx-lm-tp", 16)) for us in (10.0, 300.0, 2600.0)]
    rows.append(dict(mode="ep", batch=1, allreduce_us=None, step_ms=1.0))  # shared memory: not in the fit
    fits = _link_sweep().fits(rows)
    assert fits[("ep", 1)][0] == pytest.approx(8) and fits[("ep", 1)][1] == pytest.approx(40)
    assert fits[("mlx-lm-tp", 1)][0] == pytest.approx(16) and fits[("ep", 1)][2] == 3


def test_link_sweep_reads_the_committed_sweep(tmp_path):
    """docs/benchmarks.md's link table comes from these files through this script."""
    files = sorted(str(p) for p in (REPO / "docs" / "results").glob("net-*.json"))
    assert files, "the sweep's result files are missing"
    proc = subprocess.run([sys.executable, "examples/link_sweep.py", *files, "--plot", str(tmp_path / "sweep.png")],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table, fit = proc.stdout.split("# fit over the TCP runs")
    lines = [line for line in table.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].split() == ["link", "mode", "B", "allreduce_us", "tok/s", "ms/step", "ar/step"], table
    # The committed sweep predates the flag's rename (--tp-host-kernels, now --tp-cpu-path).
    assert "# mlx-lm-tp: " in table and ("--tp-host-kernels" in table or "--tp-cpu-path" in table), table
    rows = [line.split() for line in lines[1:]]
    links = {" ".join(r[:-6]) for r in rows}
    assert "shared memory" in links and "tcp (veth)" in links and len(links) >= 4, links
    for link in links:  # every link has every mode at both batch sizes
        assert sorted((r[-6], r[-5]) for r in rows if " ".join(r[:-6]) == link) == sorted(
            (m, b) for m in ("ep", "mlx-lm-tp", "sliced") for b in ("1", "8")), link
    assert all(r[-4] != "-" for r in rows if r[0] == "tcp"), rows  # TCP rows have an all-reduce time
    fitted = [line.split() for line in fit.splitlines()[2:] if line.strip() and not line.startswith("#")]
    assert len(fitted) == 6 and all(math.isfinite(float(r[2])) for r in fitted), fit
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_hugepages_ab_times_both_copies_every_round(tmp_path):
    argv = [sys.executable, "examples/hugepages_ab.py", "--synthetic", "tiny", "--cache-dir", str(tmp_path),
            "--rounds", "2", "--steps", "2"]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^# 2 ranks, tiny, batch 1; rank 0 moved \d+ MiB of \d+ MiB", out, re.M), out
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"] and all(float(v) > 0 for r in rows for v in r[1:]), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fault_times_reports_both_faults():
    proc = subprocess.run(
        [sys.executable, "examples/fault_times.py", "--timeout", "2"], capture_output=True, text=True,
        timeout=TIMEOUT, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kill, stop = proc.stdout.strip().splitlines()[-2:]
    assert kill.startswith("SIGKILL on rank 2: job ended after") and "0 processes left" in kill, kill
    assert stop.startswith("SIGSTOP on rank 2: job ended after") and "rank 2 stopped answering" in stop, stop


def _slice_cost():
    spec = importlib.util.spec_from_file_location("slice_cost", REPO / "examples" / "slice_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slice_cost_fit_recovers_the_fixed_cost():
    """t = A + k (a + b w): c = a / b in columns, here 20 by construction."""
    points = [(w, k, 5e-6 + k * (2e-6 + 1e-7 * w)) for w in (64, 128, 256, 512) for k in (1, 4)]
    fit = _slice_cost().fit(points)
    assert fit["c"] == pytest.approx(20) and fit["A"] == pytest.approx(5e-6) and fit["c_err"] < 1e-6


def test_slice_cost_prints_a_fit_per_kernel_and_rank(tmp_path):
    """docs/balance.md's slice-penalty measurement runs (tiny model: only the output's shape is checked)."""
    argv = [sys.executable, "examples/slice_cost.py", "--synthetic", "tiny", "--cache-dir", str(tmp_path),
            "--splits", "1,2,4", "--rows", "1", "--prefill-rows", "8", "--passes", "1"]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "expert intermediate size I = 64, top-k 2; 2 ranks at once" in out, out
    rows = re.findall(r"^\s+(decode|prefill)\s+(\d+)\s+(\d)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)", out, re.M)
    assert sorted((r[0], r[1], r[2]) for r in rows) == [
        ("decode", "1", "0"), ("decode", "1", "1"), ("prefill", "8", "0"), ("prefill", "8", "1")], out
    assert all(math.isfinite(float(v)) for r in rows for v in r[3:]), out
    # Every (kernel, rows, width, k) point of every rank: 2 kernels x 3 widths x k in (1, 2).
    assert len(re.findall(r"^#   (decode|prefill) \d+ \d+ \d: [\d.]+us [\d.]+us$", out, re.M)) == 12, out


def test_overlap_prefill_times_three_ways_with_the_same_tokens(tmp_path):
    """docs/benchmarks.md's overlap prefill measurement runs (2 ranks, one host: only the output's shape is checked)."""
    from moe_mpi import synthetic

    ckpt = synthetic.write_checkpoint(tmp_path / "qwen3_moe", synthetic.tiny_config("qwen3_moe"), seed=1)
    for extra in ([], ["--decode", "3"]):
        argv = [sys.executable, "examples/overlap_prefill.py", "--model", str(ckpt), "--batch", "4", "--tokens", "6", *extra]
        proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = re.findall(r"^(whole|halves|overlap)\s+[\d.]+ s .* greedy tokens (\w+)$", proc.stdout, re.M)
        assert rows == [("whole", "same"), ("halves", "same"), ("overlap", "same")], proc.stdout
        assert ("decode steps" in proc.stdout) == bool(extra), proc.stdout


def test_expert_kernels_times_both_kernels_by_rows(tmp_path):
    """docs/benchmarks.md's expert-kernel comparison runs (tiny 4-bit model: only the output's shape is checked)."""
    from moe_mpi import synthetic

    ckpt = synthetic.write_checkpoint(tmp_path / "q4", synthetic.tiny_config("qwen3_moe"), seed=1, quantize=4)
    argv = [sys.executable, "examples/expert_kernels.py", "--model", str(ckpt), "--experts", "2,4",
            "--rows", "1,3", "--passes", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "quantized=True" in proc.stdout, proc.stdout
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [(e, r) for e, r, *_ in rows] == [("2", "1"), ("2", "3"), ("4", "1"), ("4", "3")], proc.stdout


def test_one_process_times_both_sides_every_round(tmp_path):
    """docs/benchmarks.md's one-process comparison runs (tiny 4-bit model: only the output's shape is checked)."""
    from moe_mpi import synthetic

    ckpt = synthetic.write_checkpoint(tmp_path / "q4", synthetic.tiny_config("qwen3_moe"), seed=1, quantize=4)
    argv = [sys.executable, "examples/one_process.py", "--model", str(ckpt), "--tokens", "5", "--steps", "2",
            "--rounds", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "logits agree" in proc.stdout, proc.stdout
    rows = re.findall(r"^\| (prefill 1|prefill 5|decode) \| [\d.]+ \| [\d.]+ \| ([\d.]+), ([\d.]+) \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["prefill 1", "prefill 5", "decode"], proc.stdout
