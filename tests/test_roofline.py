"""Tests for the decode roofline model (``moe_mpi.bench.roofline``).

The byte counts are checked against hand-computed values for the
``dbrx-like`` shape and the whole-expert imbalance (of ep, and of auto's
layouts) against its exact expectation; the STREAM probe itself is
exercised by the decode benchmark run in ``test_bench_models.py``.
"""

from math import comb

import pytest

from moe_mpi.bench import roofline
from moe_mpi.bench.shapes import synthetic_config


def test_model_bytes_of_dbrx_like_by_hand():
    parts = roofline.limit_parts(synthetic_config("dbrx-like"))
    d, f, heads, kv, hd = 768, 2688, 12, 6, 64
    assert parts["expert"] == 3 * d * f * 4
    assert parts["attention_per_layer"] == (2 * d * heads * hd + 2 * d * kv * hd) * 4
    assert parts["router_per_layer"] == d * 16 * 4
    assert parts["lm_head"] == 8192 * d * 4
    assert (parts["layers"], parts["num_experts"], parts["top_k"]) == (8, 16, 4)


def test_itemsize_follows_torch_dtype():
    config = dict(synthetic_config("dbrx-like"), torch_dtype="bfloat16")
    assert roofline.limit_parts(config)["expert"] == 3 * 768 * 2688 * 2


@pytest.mark.parametrize(
    "extra", [{"quantization": {"bits": 4, "group_size": 64}}, {"kv_lora_rank": 512}, {"torch_dtype": "int8"}]
)
def test_layouts_it_does_not_model_get_no_limit(extra):
    assert roofline.limit_parts(dict(synthetic_config("dbrx-like"), **extra)) is None


def test_every_reader_of_all_experts_reads_top_k_at_batch_1():
    assert roofline.expected_experts(16, 4, 1, None) == 4.0


def test_whole_expert_imbalance_matches_the_hypergeometric_expectation():
    # 4 of 16 experts chosen, 8 per rank: the busier rank gets max(j, 4 - j).
    exact = sum(max(j, 4 - j) * comb(8, j) * comb(8, 4 - j) for j in range(5)) / comb(16, 4)
    owners = [0] * 8 + [1] * 8
    assert roofline.expected_experts(16, 4, 1, owners) == pytest.approx(exact, abs=0.02)
    assert exact == pytest.approx(2.646, abs=1e-3)


def test_bytes_per_step_and_limit_by_mode():
    parts = roofline.limit_parts(synthetic_config("dbrx-like"))
    dense = 8 * (parts["attention_per_layer"] + parts["router_per_layer"]) + parts["lm_head"]
    single = roofline.bytes_per_step(parts, "single", 2, 1)
    assert single == pytest.approx(dense + 8 * 4 * parts["expert"])
    sliced = roofline.bytes_per_step(parts, "sliced", 2, 1)
    assert sliced == pytest.approx(dense + 8 * 2 * parts["expert"])
    tp = roofline.bytes_per_step(parts, "mlx-lm-tp", 2, 1)
    assert tp == pytest.approx(sliced - 8 * parts["attention_per_layer"] / 2)
    ep = roofline.bytes_per_step(parts, "ep", 2, 1)
    assert sliced < ep < single  # the busier rank reads ~2.65 whole experts per layer
    assert roofline.bytes_per_step(parts, "central", 2, 1) == ep
    step = roofline.bytes_per_step(parts, "sliced", 2, 8)
    assert roofline.decode_limit(step, 8, 10.0) == pytest.approx(10e9 / step * 8)


def _busiest_exact(layout, top_k):
    """Exact expected experts' worth the busiest rank reads at batch 1 (every top-k set equally likely)."""
    from itertools import combinations

    n, total, count = layout.num_ranks, 0.0, 0
    for chosen in combinations(range(layout.num_experts), top_k):
        split = sum(1 for e in chosen if not layout.holders[e]) / n
        total += max(sum(1 for e in chosen if layout.holders[e] == (r,)) + split for r in range(n))
        count += 1
    return total / count


def test_auto_is_priced_by_its_layouts_not_as_ep():
    from moe_mpi.layout import Layout
    from moe_mpi.perfmodel import PerfModelError, layout_experts_read

    config = synthetic_config("dbrx-like")
    parts = roofline.limit_parts(config)
    dense = 8 * (parts["attention_per_layer"] + parts["router_per_layer"]) + parts["lm_head"]
    # Four hot experts split, the rest whole: the busiest rank reads its whole ones and half of each split one.
    mixed = Layout(2, ((),) * 4 + ((0,),) * 6 + ((1,),) * 6)
    assert layout_experts_read(mixed, 4, 1) == pytest.approx(_busiest_exact(mixed, 4), abs=0.02)
    step = roofline.bytes_per_step(parts, "auto", 2, 1, [mixed] * 8)
    assert step == pytest.approx(dense + 8 * _busiest_exact(mixed, 4) * parts["expert"], rel=0.01)
    # What auto chooses at uniform routing on 2 ranks: here every expert split, so sliced's bytes, not ep's.
    layouts = roofline.mode_layouts(config, "auto", 2)
    assert len(layouts) == 8 and all(len(x.split) == 16 for x in layouts)
    auto = roofline.bytes_per_step(parts, "auto", 2, 1, layouts)
    assert auto == pytest.approx(roofline.bytes_per_step(parts, "sliced", 2, 1))
    assert auto < roofline.bytes_per_step(parts, "ep", 2, 1)
    # ep's own layout gives ep's figure; auto without its layouts has none.
    ep = [Layout.from_owners([0] * 8 + [1] * 8, 2)] * 8
    assert roofline.bytes_per_step(parts, "ep", 2, 8, ep) == pytest.approx(roofline.bytes_per_step(parts, "ep", 2, 8))
    assert roofline.mode_layouts(config, "ep", 2) is None
    with pytest.raises(PerfModelError, match="layouts"):
        roofline.bytes_per_step(parts, "auto", 2, 1)


def test_roofline_runs_every_default_mode_of_the_other_benches():
    from moe_mpi.bench.modes import default_modes

    modes = roofline.setup_arg_parser().parse_args([]).modes
    assert modes == default_modes() and "auto" in modes


@pytest.mark.parametrize("case, message", [
    ("quantized", "bench roofline covers float"),
    # These were an error from every rank, and MPI_Abort's banner.
    ("missing", "does not exist"),
    ("decode-json", "not a `moe-mpi bench decode --json` file"),
])
def test_bad_input_is_one_error_on_every_rank(case, message, tmp_path):
    import json
    import sys
    from pathlib import Path

    from moe_mpi import launch

    config = dict(synthetic_config("dbrx-like"), quantization={"group_size": 64, "bits": 4})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "decode.json").write_text("[]")
    args = {
        "quantized": ["--model", str(tmp_path)],
        "missing": ["--model", str(tmp_path / "missing")],
        "decode-json": ["--synthetic", "tiny", "--decode-json", str(tmp_path / "decode.json")],
    }[case]
    argv = [sys.executable, "-m", "moe_mpi", "bench", "roofline", *args]
    proc = launch.run_mpirun(2, argv, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count(message) == 1 and output.count("error:") == 1, output
    assert "Traceback" not in output, output


def test_bench_roofline_prints_triad_and_read_only_limits(tmp_path):
    import json
    import sys
    from pathlib import Path

    from moe_mpi import launch

    out = tmp_path / "roofline.json"
    argv = [sys.executable, "-m", "moe_mpi", "bench", "roofline", "--synthetic", "tiny",
            "--stream-mb", "24", "--json", str(out)]
    proc = launch.run_mpirun(2, argv, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert len(result["read_together_gbs"]) == 2 and min(result["read_together_gbs"]) > 0
    config = synthetic_config("tiny")
    parts = roofline.limit_parts(config)
    # The default modes, auto included, priced by its own layouts.
    assert {row["mode"] for row in result["rows"]} == {"ep", "auto", "sliced", "central", "mlx-lm-tp", "single"}
    assert "# auto: its layouts at uniform routing" in proc.stdout
    for row in result["rows"]:
        step = roofline.bytes_per_step(parts, row["mode"], 2, row["batch"], roofline.mode_layouts(config, row["mode"], 2))
        if row["mode"] == "auto":  # tiny: auto places whole experts its own way, not ep's contiguous blocks
            assert step != pytest.approx(roofline.bytes_per_step(parts, "ep", 2, row["batch"]))
        assert row["limit_tokens_per_s"] == pytest.approx(roofline.decode_limit(step, row["batch"], row["bandwidth_gbs"]))
        if row["mode"] == "single":  # one process: no all-ranks read probe
            assert row["read_limit_tokens_per_s"] is None
        else:
            want = roofline.decode_limit(step, row["batch"], min(result["read_together_gbs"]))
            assert row["read_limit_tokens_per_s"] == pytest.approx(want)
    assert "read-only (gemv.read, sdot or gemv.matvec, the fastest) per rank" in proc.stdout and "of read" in proc.stdout
