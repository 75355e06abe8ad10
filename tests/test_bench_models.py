"""Tests for ``moe-mpi bench decode | prefill | layer | plot``.

The benchmarks run end to end under real ``mpirun`` on 2 ranks with the
``tiny`` synthetic model and very short settings. Nothing here asserts speed
(the machine may be loaded); the tests check that every mode ran on the same
model, that the JSON says what ran where, that the communication counts are
right (``ep``: exactly one all-reduce per MoE layer per forward pass), and that
every mode's logits match plain mlx-lm's. The pytest process never
initialises MPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_mpi import launch
from moe_mpi.bench import modes, routing, shapes
from moe_mpi.bench import plot as bench_plot
from moe_mpi.bench import report
from moe_mpi.shard import MODES as LOAD_MODES

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 150.0  # a hang fails the test instead of blocking the suite
# Every moe_mpi load mode plus the two mlx-lm baselines.
ALL_MODES = set(LOAD_MODES) | {"mlx-lm-tp", "single"}
TINY_MOE_LAYERS = 2  # shapes.SYNTHETIC["tiny"]: every layer is an MoE layer
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

STREAM_MB = 160  # far more than the tiny model's load transients

RUNS = {
    "decode": [
        "--batch", "1,2", "--steps", "3", "--warmup", "1", "--prompt-tokens", "8", "--stream-mb", str(STREAM_MB),
    ],
    "prefill": ["--lengths", "8,16", "--repeats", "1", "--rounds", "3"],
    "layer": ["--tokens", "1,8", "--iters", "2", "--warmup", "1"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs each benchmark once on 2 ranks; benchmark -> parsed JSON."""
    tmp = tmp_path_factory.mktemp("bench")
    cache = tmp / "cache"  # shared: the first run writes tiny, the others reuse it
    out = {}
    for name, extra in RUNS.items():
        path = tmp / f"{name}.json"
        argv = [
            sys.executable, "-m", "moe_mpi", "bench", name,
            "--synthetic", "tiny", "--cache-dir", str(cache), "--json", str(path), *extra,
        ]
        proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr}"
        with open(path) as f:
            out[name] = json.load(f)
        out[name]["_stdout"] = proc.stdout
        out[name]["_file"] = str(path)
    return out


def _rows(result, mode):
    return [r for r in result["rows"] if r["mode"] == mode]


@pytest.mark.parametrize("name", list(RUNS))
def test_every_mode_ran_and_is_recorded(results, name):
    result = results[name]
    assert result["benchmark"] == name
    assert {r["mode"] for r in result["rows"]} == ALL_MODES
    assert not any(r.get("skipped") for r in result["rows"])
    assert f"bench {name}" in result["command"]
    machine = result["machine"]
    assert machine["world_size"] == 2 and len(machine["hosts"]) == 2
    assert machine["cpu"] and machine["mlx"] and machine["mlx_lm"]
    assert len(result["blas"]) == 2
    assert all(b["kind"] and "OPENBLAS_NUM_THREADS" in b["env"] for b in result["blas"])
    assert result["model"]["synthetic"] == "tiny"
    for row in result["rows"]:
        assert len(row["mlx_peak_bytes"]) == 2 and len(row["peak_rss_bytes"]) == 2
    # Printed by rank 0 only: once per round.
    assert result["_stdout"].count("# mode ep: built") == result["config"]["rounds"]
    assert "blas rank 1:" in result["_stdout"]
    # Every rank says which matrix-vector kernel decode used.
    assert all(b["gemv"] for b in result["blas"])
    assert result["_stdout"].count("decode matrix-vector: ") == 2


@pytest.mark.parametrize("name", list(RUNS))
def test_logits_match_plain_mlx_lm(results, name):
    for mode, entry in results[name]["modes"].items():
        assert entry["status"] == "ok", mode
        assert entry["logits_max_abs_diff"] < 1e-4, mode
        assert entry["argmax_agrees"], mode


def test_decode_says_which_modes_ran_the_fused_step(results):
    # The tiny synthetic model is float32 qwen3_moe: ep and sliced decode fused.
    modes = results["decode"]["modes"]
    for mode, entry in modes.items():
        assert entry["fused_decode"] == (mode in ("ep", "sliced", "auto")), mode
    assert "# mode ep: built in" in results["decode"]["_stdout"]
    assert "decode steps: moe_mpi's numpy decode step (moe_mpi.cpu.decode)" in results["decode"]["_stdout"]


def test_decode_ep_does_one_all_reduce_per_moe_layer(results):
    for row in _rows(results["decode"], "ep"):
        assert row["collective_kinds_per_step"] == {"all_sum": TINY_MOE_LAYERS}
        assert row["collectives_per_token"] == TINY_MOE_LAYERS / row["batch"]
        assert row["counted"] == "measured"
        # float32 [B, 1, 64] partial sums, one per layer.
        assert row["bytes_per_token"] == TINY_MOE_LAYERS * 64 * 4
        assert len(row["comm_share"]) == 2 and all(0 <= s <= 1 for s in row["comm_share"])
        assert row["imbalance"] >= 1.0


def test_decode_other_modes_count_their_communication(results):
    decode = results["decode"]
    for row in _rows(decode, "central"):
        kinds = row["collective_kinds_per_step"]
        assert set(kinds) <= {"send", "recv"} and row["collectives_per_token"] > 0
    for row in _rows(decode, "mlx-lm-tp"):
        assert row["counted"] == "code"
        assert row["collectives_per_token"] == 2 * TINY_MOE_LAYERS / row["batch"]
        assert row["imbalance"] == 1.0
    for row in _rows(decode, "single"):
        assert row["collectives_per_token"] == 0 and row["imbalance"] is None
    assert {r["batch"] for r in decode["rows"]} == {1, 2}
    for row in decode["rows"]:
        assert row["steps"] == 3 and row["tokens_per_s"] > 0


def test_decode_prints_each_rows_bandwidth_limit(results):
    from moe_mpi.bench import roofline

    decode = results["decode"]
    config = decode["model"]["config"]
    parts = roofline.limit_parts(config)
    for row in decode["rows"]:
        assert row["stream_gbs"] > 0
        # auto by the layouts it loaded (at uniform routing: roofline.mode_layouts's), not as ep.
        step = roofline.bytes_per_step(parts, row["mode"], 2, row["batch"], roofline.mode_layouts(config, row["mode"], 2))
        if row["mode"] == "auto":
            assert step != pytest.approx(roofline.bytes_per_step(parts, "ep", 2, row["batch"]))
        assert row["weight_bytes_per_step"] == pytest.approx(step)
        assert row["limit_tokens_per_s"] == pytest.approx(row["stream_gbs"] * 1e9 / step * row["batch"])
        # Probed right before and right after the timed steps; the limit uses their mean.
        assert row["stream_gbs_before"] > 0 and row["stream_gbs_after"] > 0
        assert row["stream_gbs"] == pytest.approx((row["stream_gbs_before"] + row["stream_gbs_after"]) / 2)
        assert row["of_limit"] == pytest.approx(row["tokens_per_s"] / row["limit_tokens_per_s"])
        # The same for a read-only pass, in the same windows.
        assert row["read_gbs_before"] > 0 and row["read_gbs_after"] > 0
        assert row["read_gbs"] == pytest.approx((row["read_gbs_before"] + row["read_gbs_after"]) / 2)
        assert row["read_limit_tokens_per_s"] == pytest.approx(row["read_gbs"] * 1e9 / step * row["batch"])
        assert row["of_read_limit"] == pytest.approx(row["tokens_per_s"] / row["read_limit_tokens_per_s"])
    assert "%limit" in decode["_stdout"] and "before/after" in decode["_stdout"] and "%read" in decode["_stdout"]
    assert "# roofline: GB/s = mean of a STREAM triad" in decode["_stdout"]


def test_decode_peak_rss_leaves_out_the_stream_arrays(results):
    # The probe's arrays would lift every rank's peak STREAM_MB above its
    # resident set; the tiny model's own load leaves far less.
    for mode, entry in results["decode"]["modes"].items():
        for m in entry["memory"]:
            assert m["peak_rss_bytes"] - m["rss_bytes"] < STREAM_MB / 2 * 2**20, mode


def test_prefill_counts(results):
    prefill = results["prefill"]
    for row in _rows(prefill, "ep"):
        assert row["collectives_per_step"] == TINY_MOE_LAYERS  # one forward per step
        assert row["collectives_per_token"] == TINY_MOE_LAYERS / row["length"]
    for row in _rows(prefill, "central"):
        assert row["collectives_per_step"] > 0
    assert {r["length"] for r in prefill["rows"]} == {8, 16}


def test_layer_counts_and_parts(results):
    layer = results["layer"]
    for row in _rows(layer, "ep"):
        assert row["collectives_per_call"] == 1
        assert len(row["experts_ms_per_rank"]) == 2 and row["imbalance"] >= 1.0
    for row in _rows(layer, "central"):
        assert row["collectives_per_call"] > 0
    for row in _rows(layer, "single"):
        assert row["combine_ms"] == 0 and len(row["experts_ms_per_rank"]) == 1
    for row in layer["rows"]:
        assert row["layer_ms"] > 0 and row["router_ms"] > 0 and row["experts_ms"] > 0


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_rounds_report_each_modes_median_round(results):
    """--rounds 3: every mode ran 3 times; each row is its median round."""
    prefill = results["prefill"]
    assert prefill["config"]["rounds"] == 3 and len(prefill["rounds"]) == 3
    for row in prefill["rows"]:
        figures = row["rounds_tokens_per_s"]
        assert len(figures) == 3
        assert row["tokens_per_s"] == sorted(figures)[1]
        same = [
            r for rows in prefill["rounds"] for r in rows
            if r["mode"] == row["mode"] and r["length"] == row["length"]
        ]
        assert sorted(r["tokens_per_s"] for r in same) == sorted(figures)
        assert row in [dict(r, rounds_tokens_per_s=figures) for r in same]
    assert "tok/s by round" in prefill["_stdout"]


def test_median_rounds_picks_lower_median_and_keeps_skips():
    def row(mode, batch, tps, rnd):
        return {"mode": mode, "batch": batch, "tokens_per_s": tps, "round": rnd}

    rounds = [
        [row("ep", 1, 5.0, 1), row("ep", 8, 9.0, 1), {"mode": "x", "skipped": "why"}],
        [row("ep", 1, 3.0, 2), row("ep", 8, 7.0, 2), {"mode": "x", "skipped": "why"}],
    ]
    rows = report.median_rounds(rounds)
    assert [(r["mode"], r.get("batch"), r.get("round")) for r in rows] == [
        ("ep", 1, 2), ("ep", 8, 2), ("x", None, None)
    ]
    assert rows[0]["rounds_tokens_per_s"] == [5.0, 3.0]
    assert report.median_rounds(rounds[:1]) == rounds[0]


def test_plot_command(results, tmp_path):
    out = tmp_path / "all.png"
    files = [results[name]["_file"] for name in RUNS]
    assert bench_plot.main([*files, "-o", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_plot_adds_a_balance_panel_when_rows_measured_it(tmp_path):
    def result(imbalance):
        rows = [{"mode": m, "batch": 1, "tokens_per_s": 10.0, "imbalance": imbalance} for m in ("ep", "sliced")]
        return {"benchmark": "decode", "world_size": 2, "model": {"synthetic": "s"}, "rows": rows}

    assert [p[1][3] for p in bench_plot._panels([result(1.3)])] == ["tokens_per_s", "imbalance"]
    assert [p[1][3] for p in bench_plot._panels([result(None)])] == ["tokens_per_s"]
    out = tmp_path / "balance.png"
    assert bench_plot.plot_results([result(1.3)], str(out)) == 2
    assert out.stat().st_size > 1000


def test_plot_rejects_non_results(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "nope"}))
    assert bench_plot.main([str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "not a result" in capsys.readouterr().err


# ------------------------------------------------------------ unit tests


def test_mode_registry_accepts_every_load_mode():
    names = modes.mode_names()
    assert set(LOAD_MODES) <= set(names)
    assert {"mlx-lm-tp", "single"} <= set(names)
    for mode in LOAD_MODES:
        builder = modes.get_mode(mode)
        assert isinstance(builder, modes.MoeMpiMode) and builder.mode == mode
    with pytest.raises(KeyError):
        modes.get_mode("no-such-mode")


def test_modes_option_rejects_unknown_names():
    with pytest.raises(argparse.ArgumentTypeError):
        modes.modes_arg("ep,bogus")
    assert modes.modes_arg("single,ep,ep") == ["single", "ep"]


@pytest.mark.parametrize("bench, config, extra, message", [
    # Prefilled 100000 tokens on a 4096-token model: a segmentation fault after 30 s.
    ("decode", "tiny", ["--prompt-tokens", "100000"],
     "--prompt-tokens + --warmup + --steps has 100040 tokens, more than the model's context of 4096"),
    ("prefill", "tiny", ["--lengths", "8,5000"], "the longest of --lengths has 5000 tokens"),
    # A traceback from every rank.
    ("decode", [1, 2], [], "config.json must hold a JSON object, not a list"),
])
def test_bad_model_input_is_one_error_before_loading(bench, config, extra, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(shapes.synthetic_config(config) if config == "tiny" else config))
    argv = [sys.executable, "-m", "moe_mpi", "bench", bench, "--model", str(tmp_path), "--modes", "ep", *extra]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 1
    assert proc.stderr.count("moe-mpi: error:") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_synthetic_shapes():
    dbrx = shapes.synthetic_config("dbrx-like")
    assert (dbrx["hidden_size"], dbrx["num_experts"], dbrx["num_experts_per_tok"]) == (768, 16, 4)
    assert (dbrx["moe_intermediate_size"], dbrx["num_hidden_layers"]) == (2688, 8)
    assert dbrx["model_type"] == "qwen3_moe"
    assert shapes.synthetic_config("qwen3-moe-like")["num_experts"] == 128
    assert shapes.synthetic_config("mixtral-like")["num_experts_per_tok"] == 2
    a, b = shapes.synthetic_dir("tiny", "/c"), shapes.synthetic_dir("dbrx-like", "/c")
    assert a != b and a == shapes.synthetic_dir("tiny", "/c")
    assert a.name.startswith("tiny-")


def test_routing_imbalance():
    from moe_mpi.layout import Layout

    ep = [Layout.from_owners([0, 0, 1, 1], 2)]
    balanced = [(0, np.array([0, 1, 2, 3]))]
    assert routing.routing_imbalance(balanced, ep, 2)["per_layer"] == 1.0
    skewed = [(0, np.array([0, 0])), (0, np.array([0, 2]))]  # 2/0, then 1/1
    result = routing.routing_imbalance(skewed, ep, 2)
    assert result["per_layer"] == pytest.approx((2.0 + 1.0) / 2)
    assert result["pairs_per_rank"] == [3, 1] and result["layers"] == [pytest.approx(1.5)]
    split = [Layout.all_split(4, 2)]  # every expert split: balanced whatever the routing
    assert routing.routing_imbalance(skewed, split, 2)["per_layer"] == 1.0
    assert routing.routing_imbalance([], ep, 2) is None
    assert routing.routing_imbalance(balanced, None, 2) is None


def test_tp_cpu_path_flag_is_applied_and_reported(tmp_path):
    """--tp-cpu-path: the mlx-lm-tp baseline runs with moe_mpi's host
    kernels, says so in its header line and JSON, and still matches mlx-lm."""
    path = tmp_path / "tp.json"
    argv = [
        sys.executable, "-m", "moe_mpi", "bench", "decode", "--synthetic", "tiny",
        "--cache-dir", str(tmp_path / "cache"), "--modes", "mlx-lm-tp", "--tp-cpu-path",
        "--batch", "1", "--steps", "2", "--warmup", "1", "--prompt-tokens", "8", "--no-roofline",
        "--json", str(path),
    ]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# mode mlx-lm-tp: " in proc.stdout and "(--tp-cpu-path)" in proc.stdout, proc.stdout
    with open(path) as f:
        entry = json.load(f)["modes"]["mlx-lm-tp"]
    assert entry["status"] == "ok" and "--tp-cpu-path" in entry["description"]
    assert entry["logits_max_abs_diff"] < 1e-4 and entry["argmax_agrees"]


def test_modified_files_keep_their_first_letter():
    """``git status --porcelain`` lines start with a blank for unstaged changes: the first path kept its 'm'."""
    status = " M moe_mpi/bench/models.py\n M moe_mpi/shard.py\n?? moe_mpi/pages.py\nA  moe_mpi/new.py\n"
    assert report.porcelain_paths(status) == [
        "moe_mpi/bench/models.py", "moe_mpi/shard.py", "moe_mpi/pages.py", "moe_mpi/new.py"]
    assert report.porcelain_paths("") == []
    version = report.code_version()
    assert not version or (len(version["commit"]) == 40 and "\n" not in version["commit"])


# ---------------------------------------------------- checking the output


@pytest.mark.parametrize("name", ["decode", "prefill"])
def test_every_row_output_matches_mlx_lm(results, name):
    """Each mode's timed output was compared with single-process mlx-lm's and matched."""
    for row in results[name]["rows"]:
        if row["mode"] == "single":  # the reference itself
            assert row["verified"] is None
            continue
        assert row["verified"] is True and row["mismatch"] is None, row
        assert row["tokens_checked"] == (row.get("batch", 1) * (3 + 1 + 1) if name == "decode" else 1), row
        assert row["logits_max_abs_diff"] <= 1e-5 * row["logits_scale"], row
    assert "output matches single-process mlx-lm" in results[name]["_stdout"]


def test_decode_rows_count_which_code_ran(results):
    decode = results["decode"]
    for row in decode["rows"]:
        path = row["decode_path"]
        numpy = row["steps"] if row["mode"] in ("ep", "sliced", "auto") else 0
        assert path == {"numpy_steps": numpy, "model_code_steps": row["steps"] - numpy}, row
    assert decode["switches"] == [{}, {}] or all(isinstance(s, dict) for s in decode["switches"])
    assert "# switches: " in decode["_stdout"]
    assert "timed steps in moe_mpi's numpy decode step: 6 of 6" in decode["_stdout"]


def test_a_wrong_mode_is_marked_and_its_speed_is_not_a_result(tmp_path):
    path = tmp_path / "wrong.json"
    argv = [
        sys.executable, str(REPO / "tests" / "mpi_bench_wrong.py"), "--synthetic", "tiny",
        "--cache-dir", str(tmp_path / "cache"), "--modes", "ep,broken", "--batch", "1,2", "--steps", "2",
        "--warmup", "1", "--prompt-tokens", "8", "--no-roofline", "--rounds", "2", "--json", str(path),
    ]
    proc = launch.run_mpirun(2, argv, timeout=TIMEOUT, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path) as f:
        result = json.load(f)
    assert _rows(result, "ep") and all(r["verified"] is True for r in _rows(result, "ep"))
    broken = _rows(result, "broken")
    assert len(broken) == 2
    for row in broken:
        assert row["verified"] is False and row["mismatch"], row
        assert "near-tie" not in row["mismatch"] and "routing_ties" not in row, row  # no tie in this tiny model
        assert "tokens_per_s" not in row and row["unverified"]["tokens_per_s"] > 0, row
    table = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("broken")]
    assert len(table) == 2 and all("WRONG" in line for line in table), proc.stdout
    assert "# broken: built in" in proc.stdout and "output WRONG" in proc.stdout, proc.stdout
    assert re.search(r"^# reference: .* routing: 0 near-tie\(s\) in \d+ routed rows", proc.stdout, re.M), proc.stdout


def test_compare_finds_token_and_logit_mismatches():
    from moe_mpi.bench import verify

    logits = np.array([[10.0, -3.0, 2.5]], dtype=np.float32)
    ref = {"tokens": [[0], [2]], "logits": logits}
    same = verify.compare({"tokens": [[0], [2]], "logits": logits + 1e-5}, ref, 1e-5)
    assert same["verified"] and same["tokens_checked"] == 2 and same["logits_scale"] == 10.0
    token = verify.compare({"tokens": [[0], [1]], "logits": logits}, ref, 1e-5)
    assert not token["verified"] and "step 1" in token["mismatch"] and "mlx-lm 2" in token["mismatch"]
    drift = verify.compare({"tokens": [[0], [2]], "logits": logits + 1e-3}, ref, 1e-5)
    assert not drift["verified"] and "logits differ" in drift["mismatch"]
    short = verify.compare({"tokens": [[0]]}, ref, 1e-5)
    assert not short["verified"]
    row = verify.mark({"mode": "x", "tokens_per_s": 5.0, "step_ms": 1.0, "check": {}}, token)
    assert "tokens_per_s" not in row and row["unverified"] == {"tokens_per_s": 5.0, "step_ms": 1.0}
    assert "check" not in row
    assert verify.mark({"mode": "single", "tokens_per_s": 5.0}, None)["verified"] is None


def test_a_mode_wrong_in_any_round_is_wrong():
    good = {"mode": "ep", "batch": 1, "tokens_per_s": 5.0, "verified": True}
    bad = {"mode": "ep", "batch": 1, "verified": False, "mismatch": "x", "unverified": {"tokens_per_s": 9.0}}
    rows = report.median_rounds([[good], [bad], [dict(good, tokens_per_s=6.0)]])
    assert rows[0]["verified"] is False and rows[0]["rounds_tokens_per_s"] == [5.0, None, 6.0]
    assert report.speed(rows[0], "tokens_per_s", ".1f") == "WRONG"


def test_each_mode_holds_only_its_own_model(results):
    """A mode's resident memory after loading is its own shard: less than the
    whole model (single), so nothing of the mode before it is still alive."""
    modes = results["decode"]["modes"]
    whole = max(modes["single"]["model_bytes"])
    for name, entry in modes.items():
        if name != "single":
            assert max(entry["model_bytes"]) < whole, (name, entry["model_bytes"], whole)
