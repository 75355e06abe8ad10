"""``moe-mpi calibrate`` under mpirun, and its agreement with MPI's own ping-pong.

The calibration's point-to-point figures come from ``moe-mpi bench
pingpong``'s loop; ``python -m mpi4py.bench pingpong`` is MPI's (mpi4py's)
own tool for the same measurement, and the two must agree.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from moe_mpi import launch
from moe_mpi.calibrate import fit_latency_bandwidth, setup_arg_parser
from moe_mpi.plan import main as plan_main
from moe_mpi.profiles import read_profile

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300.0
SIZES = (16384, 32768, 65536)


def _output(proc) -> str:
    return f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def _mpi4py_means() -> dict:
    """Mean one-way seconds per size from ``python -m mpi4py.bench pingpong -a numpy``."""
    argv = [sys.executable, "-m", "mpi4py.bench", "pingpong", "-a", "numpy", "-m", "16384", "-n", "65536"]
    # Without --oversubscribe Open MPI binds each rank to a core, as for moe-mpi.
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO, oversubscribe=False)
    assert proc.returncode == 0, _output(proc)
    found = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+[\d.]+\s*\|\s*([\d.e+-]+)", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    assert set(SIZES) <= set(found), _output(proc)
    return found


def _moe_mpi_means(tmp_path: Path, extra=()) -> dict:
    out = tmp_path / "pp.json"
    argv = [sys.executable, "-m", "moe_mpi", "bench", "pingpong", "-m", "16K:64K", "--json", str(out), *extra]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO, oversubscribe=False)
    assert proc.returncode == 0, _output(proc)
    return {r["size_bytes"]: r["latency_us"] * 1e-6 for r in json.loads(out.read_text())["rows"]}


def _agree(ours: dict, theirs: dict) -> bool:
    return all(ours[s] == pytest.approx(theirs[s], rel=0.25, abs=1e-6) for s in SIZES)


def test_pingpong_agrees_with_mpi4py_bench(tmp_path):
    # Scheduler stalls on a busy machine only ever inflate a mean, so the
    # fastest of several runs of each tool is the like-with-like figure:
    # runs go on (up to 8 each) until those agree.
    ours, theirs = {}, {}
    for _ in range(8):
        for size, s in _moe_mpi_means(tmp_path).items():
            ours[size] = min(ours.get(size, 1.0), s)
        for size, s in _mpi4py_means().items():
            theirs[size] = min(theirs.get(size, 1.0), s)
        if _agree(ours, theirs):
            break
    # Before the fix (rank 1 echoed the buffer it had just received into)
    # moe-mpi's best was 1.4x mpi4py's at 64 KiB on this VM, run after run.
    if not _agree(ours, theirs):
        # Two timing tools compared on a machine whose cores other jobs hold
        # measure the scheduler, not MPI: say so rather than pass or fail.
        # The two ranks of the runs themselves add about 2 to the load.
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores + 1.5:
            pytest.skip(f"machine busy (load {load:.1f} on {cores} cores): {ours} against {theirs}")
    assert _agree(ours, theirs), (ours, theirs)


def test_latency_bandwidth_fit_recovers_a_line():
    sizes = [1e3, 1e4, 1e5, 1e6]
    seconds = [20e-6 + s / 5e9 for s in sizes]
    latency, bandwidth = fit_latency_bandwidth(sizes, seconds)
    assert latency == pytest.approx(20e-6, rel=1e-6)
    assert bandwidth == pytest.approx(5e9, rel=1e-6)
    with pytest.raises(ValueError, match="2\\+ points"):
        fit_latency_bandwidth([1.0], [1.0])


def test_calibrate_on_two_ranks_writes_a_profile_plan_reads(tmp_path, capsys):
    out = tmp_path / "calib.json"
    # The budget as generous as the time limit below: on a loaded VM the
    # machine probes alone may take most of the default 45 s.
    argv = [sys.executable, "-m", "moe_mpi", "calibrate", "--out", str(out), "--stream-mb", "32", "--repeats", "1",
            "--budget", "120"]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO, oversubscribe=False)
    assert proc.returncode == 0, _output(proc)
    machine, link, meta = read_profile(out)
    assert meta["ranks"] == 2 and meta["seconds"] < 120
    assert meta["gap_s"] == 0 and link.name == "shared-memory"  # one host: calls back to back
    assert machine.bandwidth > 1e8 and machine.flops > 1e8
    assert set(machine.kernels) == {"float32", "q4", "float32/expert", "q4/expert"}
    assert {"numpy/decode", "mlx/decode", "mlx-quantized/decode", "mlx/prefill"} <= set(machine.layer_seconds)
    assert set(link.allreduce) >= {"mpi4py-numpy", "mlx-mpi4py"}
    # Shared memory is fast: no sweep is cut, every size gets its planned calls.
    assert meta["stopped_early"] == [] and meta["budget_s"] == 120
    for fit in (meta["pingpong"], meta["exchange"], *meta["allreduce"].values()):
        assert fit["sizes"] == fit["sweep"]["planned_sizes"] and fit["sweep"]["stopped"] is None, fit["sweep"]
    assert 0 < link.latency < 1e-3 and link.exchange is not None
    if (os.cpu_count() or 1) >= 2:  # a core per rank: no rendezvous wait measured
        assert machine.rendezvous == () and machine.ranks_per_host == 2
    # plan reads it: machine and link 'profile'.
    assert plan_main(["--model", "dbrx-like", "--profile", str(out), "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["ranks"] for r in rows} == {1, 2}
    assert all(r["decode_tokens_per_s"] > 0 and r["link"] == link.name for r in rows if "skipped" not in r)


RENDEZVOUS_SCRIPT = """
import json, sys
from moe_mpi import Communicator
from moe_mpi.sharing import measure_rendezvous
comm = Communicator()
table = measure_rendezvous(comm, sizes_mb=(1, 8))
if comm.rank == 0:
    print(json.dumps(table))
"""


def test_rendezvous_is_measured_with_more_ranks_than_cores():
    # More ranks than this machine has cores (3 on the 2-core CI machine).
    n = max(3, (os.cpu_count() or 1) + 1)
    proc = launch.run_mpirun(n, [sys.executable, "-c", RENDEZVOUS_SCRIPT], timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, _output(proc)
    table = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(table) == 2 and table == sorted(table), table
    # Compute per product grows with the matrix; waits are measured, never negative.
    assert 0 < table[0][0] < table[1][0] and all(wait >= 0 for _, wait in table), table


@pytest.mark.parametrize("value, message", [("0", "expected a number > 0, got '0'"),
                                            ("-3", "expected a number > 0, got '-3'"),
                                            ("inf", "expected a number > 0, got 'inf'"),
                                            ("soon", "expected a number, got 'soon'")])
def test_calibrate_budget_must_be_a_positive_number(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        setup_arg_parser().parse_args(["--out", "p.json", "--budget", value])
    assert e.value.code == 2
    assert f"argument --budget: {message}" in capsys.readouterr().err


def test_calibrate_into_a_missing_directory_is_one_error(tmp_path):
    argv = [sys.executable, "-m", "moe_mpi", "calibrate", "--out", str(tmp_path / "no" / "p.json")]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO, oversubscribe=False)
    assert proc.returncode != 0
    assert proc.stderr.count("moe-mpi: error:") == 1, _output(proc)
    assert "directory" in proc.stderr and "does not exist" in proc.stderr
