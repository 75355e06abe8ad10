"""Tests for ``moe-mpi bench collectives`` / ``pingpong`` and the bench dispatcher.

The sweeps run under real ``mpirun`` with short settings; nothing here
asserts speed (the machine may be loaded), only that every path ran, every
result was checked and right, and the files are complete. The result check
itself is unit-tested on wrong buffers, since a real run never produces one.
The pytest process never initialises MPI.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_mpi import launch
from moe_mpi.bench import collectives as coll
from moe_mpi.bench import main as bench_main
from moe_mpi.bench import machine
from moe_mpi.bench.machine import format_size
from moe_mpi.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0  # a hang fails the test instead of blocking the suite
# A short sweep: 15 sizes, 4 B .. 64 KiB, large sizes above 8 KiB.
SHORT = ["-m", "4:64K", "-i", "20", "-x", "2"]
SHORT_SIZES = [4 << k for k in range(15)]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _bench(n: int, args: list[str], env: dict[str, str] | None = None):
    # The console entry (python -m moe_mpi), not `python -m mpi4py`: mpi4py
    # must not initialise MPI before MLX does, or mlx-distributed is lost.
    argv = [sys.executable, "-m", "moe_mpi", "bench", *args]
    return launch.run_mpirun(n, argv, timeout=TIMEOUT, cwd=REPO, env=env)


def _output(proc) -> str:
    return f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("dtype", coll.DTYPES)
@pytest.mark.parametrize("nranks", [1, 2, 3, 8, 22])
def test_pattern_sums_are_exact(dtype, nranks):
    """The expected sum and every input are integers exact in the dtype."""
    pattern, rtol = coll.check_pattern(1000, nranks, dtype)
    assert rtol == 0.0
    assert pattern.dtype == np.float32 and pattern.min() >= 1
    assert np.array_equal(pattern, np.round(pattern))
    limit = coll._EXACT_LIMIT[dtype]
    assert coll.expected_sum(pattern, nranks).max() <= limit
    # Same pattern on every rank without communication.
    again, _ = coll.check_pattern(1000, nranks, dtype)
    assert np.array_equal(pattern, again)


def test_pattern_falls_back_to_a_tolerance_when_exactness_is_impossible():
    pattern, rtol = coll.check_pattern(100, 40, "bfloat16")  # 820 > 256
    assert rtol > 0.0 and pattern.max() == 1


def test_simulated_reduction_has_no_wrong_elements():
    nranks = 3
    pattern, rtol = coll.check_pattern(4096, nranks)
    total = sum(coll.rank_input(pattern, r) for r in range(nranks))
    assert coll.count_wrong(total, coll.expected_sum(pattern, nranks), rtol) == 0


def test_count_wrong_detects_a_broken_reduction():
    """The check can fail: wrong values, a missing rank, NaN, wrong size."""
    nranks = 4
    pattern, rtol = coll.check_pattern(1024, nranks)
    expected = coll.expected_sum(pattern, nranks)
    ranks = [coll.rank_input(pattern, r) for r in range(nranks)]

    one_off = expected.copy()
    one_off[17] += 1
    assert coll.count_wrong(one_off, expected, rtol) == 1

    missing_rank = sum(ranks[1:])  # rank 0's contribution lost
    assert coll.count_wrong(missing_rank, expected, rtol) == expected.size

    double_counted = sum(ranks) + ranks[2]
    assert coll.count_wrong(double_counted, expected, rtol) == expected.size

    poisoned = expected.copy()
    poisoned[:10] = np.nan  # e.g. an untouched, poisoned receive buffer
    assert coll.count_wrong(poisoned, expected, rtol) == 10

    shifted = np.roll(expected, 1)  # misplaced elements
    assert coll.count_wrong(shifted, expected, rtol) > expected.size // 2

    assert coll.count_wrong(expected[:-1], expected, rtol) == expected.size
    assert coll.count_wrong(expected.astype(np.float16), expected, rtol) == 0


def test_count_wrong_with_tolerance():
    expected = np.full(8, 1000.0, dtype=np.float32)
    close = expected * np.float32(1 + 1e-3)
    assert coll.count_wrong(close, expected, rtol=1e-2) == 0
    assert coll.count_wrong(close, expected, rtol=1e-4) == 8


# ----------------------------------------------------------- size options


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4", 4),
        ("64K", 65536),
        ("1m", 1 << 20),
        ("2G", 2 << 30),
        ("64KiB", 65536),
        ("8B", 8),
    ],
)
def test_parse_size(text, expected):
    assert coll.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "4T", "-1", "1.5K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        coll.parse_size(text)


def test_parse_size_range_like_osu():
    assert coll.parse_size_range("4:1M") == (4, 1 << 20)
    assert coll.parse_size_range("1M") == (4, 1 << 20)  # -m MAX
    assert coll.parse_size_range(":8K", default_min=0) == (0, 8192)
    assert coll.parse_size_range("2") == (2, 2)  # below the default minimum
    with pytest.raises(ValueError):
        coll.parse_size_range("1M:4")


def test_message_sizes():
    assert coll.message_sizes(4, 64) == [4, 8, 16, 32, 64]
    assert coll.message_sizes(0, 4) == [0, 1, 2, 4]
    assert coll.message_sizes(3072, 3072) == [3072]  # one decode token, H=768
    assert coll.message_sizes(3000, 10000) == [3000, 6000]
    assert format_size(3 << 10) == "3 KiB" and format_size(5) == "5 B"


def test_large_messages_use_fewer_iterations():
    parser = coll.setup_arg_parser()
    args = parser.parse_args([])
    assert args.message_size == (4, 64 << 20)
    assert coll.loop_counts(args, 8192) == (1000, 20)
    assert coll.loop_counts(args, 8193) == (100, 5)
    args = parser.parse_args(["-i", "20", "-x", "2"])
    assert coll.loop_counts(args, 1 << 20) == (20, 2)  # never more than -i/-x
    args = parser.parse_args(
        ["--iterations-large", "7", "--warmup-large", "0", "--large-threshold", "1K"]
    )
    assert coll.loop_counts(args, 1024) == (1000, 20)
    assert coll.loop_counts(args, 2048) == (7, 0)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    args = coll.setup_arg_parser().parse_args(["--plot", str(tmp_path / "x.png")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        coll.check_outputs(args)


def test_output_directory_must_exist(tmp_path):
    args = coll.setup_arg_parser().parse_args(
        ["--json", str(tmp_path / "no" / "x.json")]
    )
    with pytest.raises(UserError, match="does not exist"):
        coll.check_outputs(args)


# --------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "invalid choice"),
        ([], "required"),
        (["collectives", "--paths", "mpi4py-numpy,bogus"], "unknown path"),
        (["collectives", "-m", "64K:4"], "minimum exceeds maximum"),
        (["pingpong", "-i", "0"], "expected a positive integer, got '0'"),
    ],
)
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    # Rejected by argparse before MPI is initialised, so this runs in-process.
    with pytest.raises(SystemExit) as info:
        bench_main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_benchmarks(capsys):
    with pytest.raises(SystemExit) as info:
        bench_main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("collectives", "pingpong", "decode", "prefill", "layer"):
        assert name in out


# ------------------------------------------------------------- under MPI


def _check_collectives_json(path: Path, n: int, paths: list[str], sizes: list[int]):
    data = json.loads(path.read_text())
    machine = data["machine"]
    assert machine["world_size"] == n and len(machine["hosts"]) == n
    for key in (
        "cpu",
        "cores",
        "memory_bytes",
        "os",
        "python",
        "mlx",
        "mlx_lm",
        "mpi4py",
        "mpi_library",
        "command",
        "argv",
        "date",
    ):
        assert machine.get(key) is not None, key
    assert "collectives" in machine["command"]
    assert machine["env"].get("OMPI_COMM_WORLD_SIZE") == str(n)
    rows = data["rows"]
    got = sorted((r["path"], r["size_bytes"]) for r in rows)
    assert got == sorted((p, s) for p in paths for s in sizes)
    for row in rows:
        assert row["wrong"] == 0, row
        assert row["count"] * 4 == row["size_bytes"]
        assert len(row["per_rank_us"]) == n
        assert 0 < row["min_us"] <= row["avg_us"] <= row["max_us"]
        assert row["p50_us"] > 0 and len(row["per_rank_p50_us"]) == n
        factor = 2 * (n - 1) / n
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * factor)
        assert row["iterations"] == 20 and row["warmup"] == 2
    assert data["wrong_total"] == 0
    return data


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_sweep(n, tmp_path):
    json_file, csv_file = tmp_path / "ar.json", tmp_path / "ar.csv"
    extra = ["--json", str(json_file), "--csv", str(csv_file)]
    plot_file = tmp_path / "ar.png"
    if HAVE_MATPLOTLIB and n == 2:
        extra += ["--plot", str(plot_file)]
    proc = _bench(n, ["collectives", *SHORT, *extra])
    assert proc.returncode == 0, _output(proc)
    out = proc.stdout
    assert f"# ranks: {n} on 1 host" in out, _output(proc)
    assert "skipped" not in out, _output(proc)
    for path in coll.PATHS:
        # Every path has one table row per size, each with #wrong == 0.
        lines = [
            line.split()
            for line in out.splitlines()
            if f" {path} " in line and not line.startswith("#")
        ]
        assert len(lines) == len(SHORT_SIZES), _output(proc)
        assert all(fields[-2] == "0" for fields in lines), _output(proc)
    assert "#wrong in total: 0 (OK)" in out
    _check_collectives_json(json_file, n, list(coll.PATHS), SHORT_SIZES)
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(coll.PATHS) * len(SHORT_SIZES)
    assert {row["wrong"] for row in rows} == {"0"}
    if "--plot" in extra:
        assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collectives_skips_unavailable_paths(tmp_path):
    """MLX cannot load libmpi and numpy has no bfloat16: a note for each
    skipped path, the remaining path still runs and is exact, exit 0."""
    json_file = tmp_path / "ar.json"
    env = dict(os.environ, MLX_MPI_LIBNAME="/nonexistent/libmpi.so")
    proc = _bench(
        2,
        [
            "collectives",
            "-d",
            "bfloat16",
            "-m",
            "2:64",
            "-i",
            "5",
            "-x",
            "1",
            "--json",
            str(json_file),
        ],
        env=env,
    )
    assert proc.returncode == 0, _output(proc)
    assert "NOTE: path mlx-distributed skipped" in proc.stdout, _output(proc)
    assert "NOTE: path mpi4py-numpy skipped: numpy has no bfloat16" in proc.stdout
    data = json.loads(json_file.read_text())
    assert set(data["config"]["skipped_paths"]) == {"mlx-distributed", "mpi4py-numpy"}
    rows = data["rows"]
    assert {row["path"] for row in rows} == {"mlx-mpi4py"}
    assert len(rows) == 6  # 2 B .. 64 B
    assert all(
        row["wrong"] == 0 and row["count"] * 2 == row["size_bytes"] for row in rows
    )


def test_pingpong(tmp_path):
    json_file = tmp_path / "pp.json"
    proc = _bench(
        2, ["pingpong", "-m", "0:16K", "-i", "10", "-x", "2", "--json", str(json_file)]
    )
    assert proc.returncode == 0, _output(proc)
    assert "#wrong in total: 0 (OK)" in proc.stdout, _output(proc)
    data = json.loads(json_file.read_text())
    assert data["machine"]["world_size"] == 2
    rows = data["rows"]
    assert [row["size_bytes"] for row in rows] == [0] + [1 << k for k in range(15)]
    assert all(row["wrong"] == 0 and row["latency_us"] > 0 for row in rows)
    assert all(row["p50_us"] > 0 for row in rows)


def test_pingpong_needs_two_ranks():
    proc = _bench(1, ["pingpong", "-m", "0:8", "-i", "5"])
    assert proc.returncode != 0
    assert "pingpong needs 2 ranks" in proc.stderr, _output(proc)


def test_cpu_ranges():
    assert machine.cpu_ranges([5, 0, 1, 2]) == "0-2,5"
    assert machine.cpu_ranges([3]) == "3"


def _ranks(*specs):
    return {"ranks": [dict(rank=r, cpus=cpus, cores={"logical": 2}, boot_id=boot, hostname=host)
                      for r, (cpus, boot, host) in enumerate(specs)]}


@pytest.mark.parametrize("specs, warned", [
    ((([0], "b1", "moe-a"), ([0], "b1", "moe-b")), True),   # fake hosts on one machine, both on core 0
    ((([0], None, "vm"), ([0], None, "vm")), True),         # no boot id: the hostname decides
    ((([0], "b1", "moe-a"), ([1], "b1", "moe-b")), False),  # pinned apart
    ((([0, 1], "b1", "vm"), ([0, 1], "b1", "vm")), False),  # not bound at all
    ((([0], "b1", "mac1"), ([0], "b2", "mac2")), False),    # two machines
])
def test_ranks_bound_to_the_same_cpus_are_warned_about(specs, warned):
    warnings = machine.shared_cpu_warnings(_ranks(*specs))
    assert bool(warnings) == warned, warnings
    if warned:
        assert warnings == ["WARNING: ranks 0 and 1 are bound to the same CPUs (0) on one machine: they share cores"]
        lines = machine.header_lines(dict(_ranks(*specs), command="x", world_size=2, nodes=[], date="d"), "t")
        assert "# cpus per rank: 0: 0; 1: 0" in lines and "# " + warnings[0] in lines
