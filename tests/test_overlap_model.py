"""The overlap term of the performance model (moe_mpi/overlap_model.py), by hand, and in ``moe-mpi plan``."""

import pytest

from moe_mpi import perfmodel as pm
from moe_mpi.overlap_model import predict_overlap
from moe_mpi.plan import main as plan_main
from moe_mpi.profiles import Link, Machine

# Only reading costs (1 GB/s); a call reads every weight once, whatever its rows.
READER = Machine("reader", memory_bytes=2**40, bandwidth=1e9, flops=1e30)


def shape() -> pm.ModelShape:
    """1 layer, hidden 4, 2 experts, top-2 (every token uses both): ``sliced`` reads half of each."""
    return pm.ModelShape(name="hand", layers=1, moe_layers=1, hidden=4, vocab=8, heads=2, kv_heads=1, head_dim=2,
                         experts=2, top_k=2, expert_inter=8)


def hand(s, link, tokens):
    """(layer compute, all-reduce, head) of one sliced call of ``tokens`` rows on 2 readers."""
    layer = (s.attention_bytes + s.router_bytes + s.expert_bytes) / READER.bandwidth  # two half experts
    comm = link.latency + tokens * s.hidden * 4 / link.bandwidth
    return layer, comm, s.lm_head_bytes / READER.bandwidth


def test_plain_prediction_without_a_second_cohort():
    s, link = shape(), Link("l", 1e-6, 1e9)
    for ranks, tokens in (([READER] * 2, 1), ([READER], 8)):
        plain = pm.predict(s, "sliced", ranks, link if len(ranks) > 1 else None, tokens)
        over = predict_overlap(s, "sliced", ranks, link if len(ranks) > 1 else None, tokens)
        assert over.seconds == pytest.approx(plain.seconds) and over.mode == "sliced+overlap"


def test_a_fast_link_hides_nothing_and_the_weights_are_read_twice():
    s, link = shape(), Link("fast", 1e-9, 1e12)
    layer, _, head = hand(s, link, 2)
    whole = pm.predict(s, "sliced", [READER] * 2, link, 4)
    over = predict_overlap(s, "sliced", [READER] * 2, link, 4)
    # Each cohort reads every weight: twice the compute, the link hidden behind it.
    assert over.seconds == pytest.approx(2 * layer + 2 * head)
    assert over.comm_seconds == 0
    assert over.seconds > whole.seconds


def test_a_slow_link_is_hidden_behind_the_other_cohorts_compute():
    s = shape()
    layer, _, head = hand(s, Link("x", 0, 1e9), 2)
    # A bandwidth-bound link on which one half batch's all-reduce takes exactly one layer's compute.
    link = Link("slow", 0.0, 2 * s.hidden * 4 / layer)
    _, comm2, _ = hand(s, link, 2)
    assert comm2 == pytest.approx(layer)
    whole = pm.predict(s, "sliced", [READER] * 2, link, 4)
    assert whole.seconds == pytest.approx(layer + 2 * comm2 + head)  # 4 rows: twice the bytes
    over = predict_overlap(s, "sliced", [READER] * 2, link, 4)
    # max(compute A + B, link A + B) = 2 layer; plus both heads.
    assert over.seconds == pytest.approx(2 * layer + 2 * head)
    assert over.seconds < whole.seconds
    # A slower link still: the link sets the pace, and what compute does not hide is exposed.
    slower = Link("slower", 0.0, link.bandwidth / 2)
    over = predict_overlap(s, "sliced", [READER] * 2, slower, 4)
    assert over.seconds == pytest.approx(4 * layer + 2 * head)
    assert over.comm_seconds == pytest.approx(2 * layer)


def test_plan_shows_overlap_rows_and_refuses_it_where_serve_has_none(capsys):
    assert plan_main(["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "10gbe", "--batch", "16",
                      "--modes", "auto,auto+overlap,sliced+heads+overlap"]) == 0
    out = capsys.readouterr().out
    assert "auto+overlap  2" in out and "sliced+heads+overlap  2" in out, out
    with pytest.raises(SystemExit) as exit_:
        plan_main(["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "10gbe", "--modes", "central+overlap"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.count("overlap is moe-mpi serve's, for modes ep, sliced and auto") == 1
