"""The performance model's arithmetic on cases worked by hand, and ``moe-mpi plan``.

Every expected number below is written as the formula it comes from, so a
change of the model that changes a term fails here with the term named.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_mpi import perfmodel as pm
from moe_mpi.bench.shapes import synthetic_config
from moe_mpi.plan import main as plan_main
from moe_mpi.sharing import host_speeds, rendezvous_wait, shared_makespan
from moe_mpi.profiles import (
    LINKS,
    MACHINES,
    AllReduceFit,
    KernelTable,
    Link,
    Machine,
    ProfileError,
    find_machine,
    parse_machines,
    read_profile,
    write_profile,
)

REPO = Path(__file__).resolve().parent.parent

# A machine whose only cost is reading: 1 GB/s, arithmetic free, no fixed costs.
READER = Machine("reader", memory_bytes=2**40, bandwidth=1e9, flops=1e30)


def tiny_shape(**kw) -> pm.ModelShape:
    """1 layer, hidden 4, 2 experts, top-1, float32: small enough to add up by hand."""
    base = dict(name="hand", layers=1, moe_layers=1, hidden=4, vocab=8, heads=2, kv_heads=1, head_dim=2,
                experts=2, top_k=1, expert_inter=8)
    return pm.ModelShape(**{**base, **kw})


# ------------------------------------------------------------------ bytes


def test_bytes_of_dbrx_like_by_hand():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    d, f, heads, kv, hd = 768, 2688, 12, 6, 64
    assert s.attention_bytes == (2 * d * heads * hd + 2 * d * kv * hd) * 4
    assert s.expert_bytes == 3 * d * f * 4
    assert s.router_bytes == d * 16 * 4
    assert s.lm_head_bytes == 8192 * d * 4
    assert s.kv_bytes_per_token == 8 * 2 * kv * hd * 4
    assert (s.layers, s.moe_layers, s.experts, s.top_k, s.fmt) == (8, 8, 16, 4, "float32")


def test_quantized_bytes_count_scales_and_biases():
    config = dict(synthetic_config("dbrx-like"), quantization={
        "bits": 4, "group_size": 64, "model.layers.0.mlp.gate": {"bits": 8, "group_size": 64}})
    s = pm.ModelShape.from_config(config)
    # float32 scale and bias per group of 64: 4 + 64/64 bits; the router is 8-bit.
    assert s.fmt == "q4" and s.weight_bits == 4 + 2 * 32 / 64 and s.router_bits == 8 + 2 * 32 / 64
    assert s.expert_bytes == 3 * 768 * 2688 * 5 / 8


def test_dbrx_has_its_published_132b_parameters():
    from moe_mpi.plan import KNOWN_MODELS

    s = pm.ModelShape.from_config(KNOWN_MODELS["dbrx"])
    assert (s.hidden, s.layers, s.experts, s.top_k, s.kv_heads) == (6144, 40, 16, 4, 8)
    assert s.weight_bytes / 2 == pytest.approx(132e9, rel=0.01)  # bfloat16


def test_byte_model_matches_the_sharding_plan_of_a_checkpoint(tmp_path):
    """ModelShape's count against moe_mpi.memory.plan_memory (the real sharding pass)."""
    from moe_mpi.memory import plan_memory
    from moe_mpi.synthetic import tiny_config, write_checkpoint

    config = tiny_config("qwen3_moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, vocab_size=512)
    for bits in (None, 4):
        path = write_checkpoint(tmp_path / f"m{bits}", config, quantize=bits, group_size=64, tokenizer=False)
        shape = pm.ModelShape.from_config(json.loads((path / "config.json").read_text()))
        for n in (1, 2):
            planned = [r.weight_bytes for r in plan_memory(path, n).ranks]
            ours = pm.memory_per_rank(shape, "ep", n, 0)
            assert ours == pytest.approx(planned, rel=0.01), (bits, n)


def test_a_model_without_moe_layers_is_an_error():
    dense = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 100, "intermediate_size": 128}
    with pytest.raises(pm.PerfModelError, match="has no MoE layers"):
        pm.ModelShape.from_config(dense, name="llama")


# ------------------------------------------------------------------ machines and links


def test_roofline_kernel_is_the_slower_of_reading_and_arithmetic():
    m = MACHINES["m2-ultra-192"]
    assert m.bandwidth == 800e9 and m.memory_bytes == 192 * 2**30
    # 1 GB of bfloat16 (5e8 weights): one row reads (1.25 ms), 512 rows compute.
    assert m.kernel_seconds("bfloat16", 1e9, 1, 16) == pytest.approx(1e9 / 800e9)
    assert m.kernel_seconds("bfloat16", 1e9, 512, 16) == pytest.approx(2 * 512 * 5e8 / m.flops)


def test_kernel_table_interpolates_in_rows_and_grows_beyond():
    t = KernelTable((1, 4), (1e-9, 4e-9))
    assert t.per_byte(2) == pytest.approx(2e-9)  # a third of the way in rows: exact for time in proportion to rows
    assert KernelTable((16, 64), (1.6e-8, 6.4e-8)).per_byte(32) == pytest.approx(3.2e-8)  # not 4e-8 (log rows)
    assert KernelTable((1, 8), (1e-9, 1e-9)).per_byte(4) == pytest.approx(1e-9)  # memory-bound: flat
    assert t.per_byte(8) == pytest.approx(8e-9)  # arithmetic-bound beyond: in proportion
    assert t.per_byte(1) == pytest.approx(1e-9)
    with pytest.raises(ProfileError, match="rise"):
        KernelTable((4, 1), (1e-9, 1e-9))


def test_allreduce_rules():
    link = Link("l", latency=10e-6, bandwidth=1e9)
    assert link.allreduce_seconds(1000, 2) == pytest.approx(10e-6 + 1e-6)
    assert link.allreduce_seconds(1000, 4) == pytest.approx(2 * (10e-6 + 1e-6))  # recursive doubling
    big = 1e8  # ring wins: 2(n-1) latencies, 2(n-1)/n of the bytes
    assert link.allreduce_seconds(big, 4) == pytest.approx(6 * 10e-6 + 1.5 * big / 1e9)
    mesh = Link("m", 10e-6, 1e9, mesh=True)
    assert mesh.allreduce_seconds(1000, 4) == pytest.approx(11e-6)
    fitted = Link("f", 1e-6, 1e9, allreduce={"default": AllReduceFit(20e-6, 2e9, 2)})
    assert fitted.allreduce_seconds(2000, 2) == pytest.approx(21e-6)
    assert fitted.allreduce_seconds(2000, 4) == pytest.approx(42e-6)  # measured at 2, two rounds at 4
    assert link.allreduce_seconds(1000, 1) == 0.0


def test_measured_points_are_interpolated():
    curve = AllReduceFit(0.0, 1e9, 2, (1000, 2000), (5e-6, 7e-6))
    assert curve.seconds(1500) == pytest.approx(6e-6)
    assert curve.seconds(500) == pytest.approx(5e-6)
    assert curve.seconds(3000) == pytest.approx(9e-6)


def test_machine_names_and_errors():
    assert [m.name for m in parse_machines("m2-ultra-192:2,m3-ultra-512")] == ["m2-ultra-192"] * 2 + ["m3-ultra-512"]
    with pytest.raises(ProfileError, match="unknown machine 'm9-max-1'"):
        find_machine("m9-max-1")
    with pytest.raises(ProfileError, match="no M4 Ultra"):
        find_machine("m4-ultra-192")
    with pytest.raises(ProfileError, match="count must be at least 1"):
        parse_machines("m2-ultra-192:0")
    assert set(LINKS) == {"10gbe", "tb4-tcp", "tb5-tcp", "tb5-rdma"}


# ------------------------------------------------------------------ predictions by hand


def _hand_parts(s: pm.ModelShape):
    bw = READER.bandwidth
    attention, router, expert, head = (x / bw for x in (s.attention_bytes, s.router_bytes, s.expert_bytes, s.lm_head_bytes))
    return attention, router, expert, head


LINK = Link("hand", latency=1e-6, bandwidth=1e9)


def test_ep_decode_by_hand():
    s = tiny_shape()
    attention, router, expert, head = _hand_parts(s)
    # 2 experts, top-1, one per rank: the busy rank reads exactly one expert;
    # one all-reduce of 4 float32 values: 1 us + 16 B / 1 GB/s.
    p = pm.predict(s, "ep", [READER] * 2, LINK, tokens=1)
    assert p.seconds == pytest.approx(attention + router + expert + head + 1e-6 + 16 / 1e9)
    assert p.comm_seconds == pytest.approx(1e-6 + 16 / 1e9)
    assert p.tokens_per_s == pytest.approx(1 / p.seconds)


def test_sliced_tp_and_single_by_hand():
    s = tiny_shape(kv_heads=2)  # tensor parallel splits the KV heads too
    attention, router, expert, head = _hand_parts(s)
    ar = 1e-6 + 16 / 1e9
    sliced = pm.predict(s, "sliced", [READER] * 2, LINK, 1)
    assert sliced.seconds == pytest.approx(attention + router + expert / 2 + head + ar)
    tp = pm.predict(s, "mlx-lm-tp", [READER] * 2, LINK, 1)
    assert tp.seconds == pytest.approx(attention / 2 + router + expert / 2 + head + 2 * ar)  # two all-reduces
    single = pm.predict(s, "single", [READER], None, 1)
    assert single.seconds == pytest.approx(attention + router + expert + head) and single.comm_seconds == 0


def test_attention_split_by_heads_by_hand():
    """ep+heads: the busy rank reads half the attention and half the KV cache, and pays a
    second all-reduce (moe_mpi's data path: float32 values, as the MoE layer's)."""
    s = tiny_shape(kv_heads=2)
    attention, router, expert, head = _hand_parts(s)
    ar = 1e-6 + 16 / 1e9
    p = pm.predict(s, "ep+heads", [READER] * 2, LINK, 1, context=1000)
    kv = 1000 * 2 * 2 * 2 * 4 / 1e9  # tokens x (K, V) x kv heads x head dim x 4 bytes
    assert p.seconds == pytest.approx(attention / 2 + kv / 2 + router + expert + head + 2 * ar)
    assert p.comm_seconds == pytest.approx(2 * ar)
    ep = pm.predict(s, "ep", [READER] * 2, LINK, 1, context=1000)
    assert ep.seconds - p.seconds == pytest.approx(attention / 2 + kv / 2 - ar)


def test_lm_head_split_by_hand():
    """sliced+vocab: the busy rank reads half the LM head and pays one all-gather of the logits
    per step (8 float32 logits: half of a ring all-reduce of 32 B), on top of the MoE layer's all-reduce."""
    s = tiny_shape()
    attention, router, expert, head = _hand_parts(s)
    ar = 1e-6 + 16 / 1e9
    gather = 1e-6 + 16 / 1e9  # LINK's all-reduce of 32 B / 2
    p = pm.predict(s, "sliced+vocab", [READER] * 2, LINK, 1)
    assert p.seconds == pytest.approx(attention + router + expert / 2 + head / 2 + ar + gather)
    assert p.comm_seconds == pytest.approx(ar + gather)
    both = pm.predict(s, "sliced+heads+vocab", [READER] * 2, LINK, 1)
    assert both.seconds == pytest.approx(pm.predict(s, "sliced+heads", [READER] * 2, LINK, 1).seconds - head / 2 + gather)
    one = pm.predict(s, "sliced+vocab", [READER], None, 1)  # one rank: the whole head, nothing gathered
    assert one.seconds == pytest.approx(attention + router + expert + head) and one.comm_seconds == 0
    assert pm.memory_per_rank(s, "ep+vocab", 2, 0)[0] == pytest.approx(pm.memory_per_rank(s, "ep", 2, 0)[0] - s.lm_head_bytes / 2)
    tied = tiny_shape(tied_embeddings=True)  # the head is the embedding, kept whole for the lookup
    assert pm.memory_per_rank(tied, "ep+vocab", 2, 0) == pytest.approx(pm.memory_per_rank(tied, "ep", 2, 0))


@pytest.mark.parametrize("heads, kv_heads, n, share", [(12, 6, 2, 1 / 2), (12, 6, 4, 2 / 6), (32, 8, 3, 3 / 8),
                                                       (4, 2, 3, 1 / 2), (8, 1, 3, 3 / 8), (4, 4, 1, 1.0)])
def test_head_share_is_the_busiest_rank_of_the_split(heads, kv_heads, n, share):
    from moe_mpi.attention import head_ranges

    s = tiny_shape(heads=heads, kv_heads=kv_heads)
    assert pm.head_share(s, n) == pytest.approx(share)
    busiest = max(q1 - q0 for (q0, q1), _ in (head_ranges(heads, kv_heads, r, n) for r in range(n)))
    assert busiest / heads == pytest.approx(share)  # the model takes the split moe_mpi makes


def test_central_exchanges_only_when_a_worker_has_rows():
    s = tiny_shape()
    attention, router, expert, head = _hand_parts(s)
    # Half the tokens go to rank 1's expert: one exchange of 1 row out and 1 back (2 x 16 B).
    p = pm.predict(s, "central", [READER] * 2, LINK, 1)
    exchange = 2 * 1e-6 + 32 / 1e9
    assert p.comm_seconds == pytest.approx(0.5 * exchange, rel=0.05)
    skew = pm.Routing.from_counts([[1, 0]], 2)  # every token to expert 0, on rank 0
    assert pm.predict(s, "central", [READER] * 2, LINK, 1, routing=skew).comm_seconds == 0


def test_decode_reads_the_kv_cache():
    s = tiny_shape()
    without = pm.predict(s, "ep", [READER] * 2, LINK, 1, context=0)
    with_kv = pm.predict(s, "ep", [READER] * 2, LINK, 1, context=1000)
    assert with_kv.seconds - without.seconds == pytest.approx(1000 * 2 * 1 * 2 * 4 / 1e9)


def test_imbalance_input_replaces_the_drawn_busiest_rank():
    s = tiny_shape(experts=4, top_k=1)
    _, _, expert, _ = _hand_parts(s)
    base = pm.predict(s, "ep", [READER] * 2, LINK, 1, imbalance=[1.0])
    double = pm.predict(s, "ep", [READER] * 2, LINK, 1, imbalance=[2.0])
    # Mean rank reads half an expert per token; twice that is one expert.
    assert double.seconds - base.seconds == pytest.approx(expert / 2)
    with pytest.raises(pm.PerfModelError, match="one value per MoE layer"):
        pm.predict(s, "ep", [READER] * 2, LINK, 1, imbalance=[1.0, 1.0])


def test_whole_experts_pay_the_busiest_rank():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    ep = pm.predict(s, "ep", [READER] * 2, LINK, 1).parts["experts"]
    # 4 of 16 experts, 8 per rank: the busier rank reads 2.646 on average (hypergeometric).
    assert ep == pytest.approx(8 * 2.646 * s.expert_bytes / 1e9, rel=0.02)


def test_ranks_sharing_too_few_cores_share_them_as_they_finish():
    # 3 ranks on 2 cores, rates measured with all 3 computing (2/3 of a core each).
    m = Machine("vm", 2**40, 1e9, 1e30, cores=2, ranks_per_host=3)
    speeds = host_speeds([m] * 3)
    assert len(speeds) == 1 and speeds[0] == pytest.approx([1.5, 1.5, 1.0])  # j = 1, 2, 3 computing
    # Work 3, 1, 1 s at the measured rate = 2, 2/3, 2/3 core-seconds. All three
    # run at 2/3 of a core until the small ones finish (1 s), then the big one
    # has a core to itself for its last 4/3 core-seconds.
    assert shared_makespan(np.array([[3.0, 1.0, 1.0]]), speeds) == pytest.approx([1 + 4 / 3])
    # Even work is what was measured: no change.
    assert shared_makespan(np.array([[2.0, 2.0, 2.0]]), speeds) == pytest.approx([2.0])
    # A core per rank, or unknown cores (built-ins): the busiest rank, as measured.
    for machine in (Machine("mac", 2**40, 1e9, 1e30, cores=4, ranks_per_host=3), READER):
        assert shared_makespan(np.array([[3.0, 1.0, 1.0]]), host_speeds([machine] * 3)) == pytest.approx([3.0])
    # Two hosts of 2 ranks on 1 core each: each host finishes apart, the later one counts.
    two = host_speeds([Machine("h", 2**40, 1e9, 1e30, cores=1, ranks_per_host=2)] * 4)
    assert [list(x) for x in two] == [[2.0, 1.0], [2.0, 1.0]]
    assert shared_makespan(np.array([[1.0, 3.0, 2.0, 2.0]]), two) == pytest.approx([max(1 + 2 / 2, 2.0)])


def test_rendezvous_wait_is_the_measured_curve_less_the_uneven_tail():
    # Measured: 1 ms of wait per collective from 2 ms of compute on (linear from 0 below).
    m = Machine("vm", 2**40, 1e9, 1e30, cores=2, ranks_per_host=3, rendezvous=[[0.008, 0.001], [0.002, 0.001]])
    assert m.rendezvous == ((0.002, 0.001), (0.008, 0.001))  # sorted, tuples
    assert m.rendezvous_seconds([0.001, 0.004, 0.02]) == pytest.approx([0.0005, 0.001, 0.001])
    speeds = host_speeds([m] * 3)
    # Even work: the whole wait.
    assert rendezvous_wait(np.array([[0.004] * 3]), speeds, [m] * 3) == pytest.approx([0.001])
    # 4.5, 4, 4 ms: the two light ranks finish at 4 ms, the busiest runs its
    # last 0.5 ms at 1.5x (a core to itself) for 1/3 ms, which the wait covers in part.
    assert rendezvous_wait(np.array([[0.0045, 0.004, 0.004]]), speeds, [m] * 3) == pytest.approx([0.001 - 0.0005 / 1.5])
    # 6, 2, 2 ms: the busiest computes alone for 2.67 ms, longer than the wait.
    assert rendezvous_wait(np.array([[0.006, 0.002, 0.002]]), speeds, [m] * 3) == pytest.approx([0.0])
    # A core per rank, or no measurement: nothing.
    for other in (Machine("mac", 2**40, 1e9, 1e30, cores=4, ranks_per_host=3, rendezvous=m.rendezvous), READER):
        assert rendezvous_wait(np.array([[0.004] * 3]), host_speeds([other] * 3), [other] * 3) == pytest.approx([0.0])


def test_rendezvous_is_paid_once_per_collective():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    shared = Machine("vm", 2**40, 1e9, 1e30, cores=2, ranks_per_host=3, rendezvous=((0.001, 0.001),))
    link = Link("shm", 1e-6, 1e12)
    # Every layer computes for more than 1 ms at 1 GB/s, so each collective waits the full 1 ms:
    # one all-reduce per MoE layer in sliced, two per layer in tensor parallelism.
    assert pm.predict(s, "sliced", [shared] * 3, link, 1).parts["wait"] == pytest.approx(s.moe_layers * 0.001)
    assert pm.predict(s, "mlx-lm-tp", [shared] * 3, link, 1).parts["wait"] == pytest.approx(2 * s.layers * 0.001)
    # ep's busiest rank computes with a core to itself after the others finish (an
    # expert is 25 ms here), which covers the wait.
    assert pm.predict(s, "ep", [shared] * 3, link, 1).parts["wait"] < 0.1 * s.moe_layers * 0.001
    plain = Machine("vm", 2**40, 1e9, 1e30, cores=2, ranks_per_host=3)
    assert pm.predict(s, "sliced", [plain] * 3, link, 1).parts["wait"] == 0.0
    assert pm.predict(s, "sliced", [shared], None, 1).parts["wait"] == 0.0


def test_oversubscribed_uneven_modes_gain_and_even_ones_do_not():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    alone = Machine("vm", 2**40, 1e9, 1e30)
    shared = Machine("vm", 2**40, 1e9, 1e30, cores=2, ranks_per_host=3)
    for mode, gains in (("ep", True), ("central", True), ("sliced", False), ("mlx-lm-tp", False)):
        a = pm.predict(s, mode, [alone] * 3, LINK, 1).seconds
        b = pm.predict(s, mode, [shared] * 3, LINK, 1).seconds
        assert (b < a * 0.99) if gains else b == pytest.approx(a), mode


def test_prefill_is_arithmetic_bound_on_a_roofline_machine():
    s = tiny_shape(hidden=1024, expert_inter=4096, vocab=1024, heads=8, kv_heads=8, head_dim=128)
    m = Machine("x", 2**40, bandwidth=1e12, flops=1e12)
    p = pm.predict(s, "single", [m], None, tokens=4096, phase="prefill")
    params = (s.attention_bytes + s.router_bytes + s.expert_bytes + s.lm_head_bytes) / 4
    attention_core = 2 * 4096 * 4096 * 8 * 128 / 1e12
    assert p.seconds == pytest.approx(2 * 4096 * params / 1e12 + attention_core, rel=1e-6)


def test_fixed_costs_follow_the_code_path():
    m = Machine("cpu", 2**40, 1e9, 1e30, numpy_decode=True,
                layer_seconds={"numpy/decode": 1e-3, "mlx/decode": 5e-3}, step_seconds={"numpy/decode": 2e-3})
    s = tiny_shape()
    assert pm.predict(s, "ep", [m] * 2, LINK, 1).parts["fixed"] == pytest.approx(1e-3 + 2e-3)
    assert pm.predict(s, "central", [m] * 2, LINK, 1).parts["fixed"] == pytest.approx(5e-3)


def test_router_statistics_skew_the_load():
    s = tiny_shape(experts=4, top_k=1)
    _, _, expert, _ = _hand_parts(s)
    hot = pm.Routing.from_counts([[100, 0, 0, 0]], 4)
    assert pm.predict(s, "ep", [READER] * 2, LINK, 8, routing=hot).parts["experts"] == pytest.approx(expert)
    with pytest.raises(pm.PerfModelError, match="expected 4 non-negative counts"):
        pm.Routing.from_counts([[1, 2]], 4)


def test_layouts_split_and_replicated_experts_by_hand():
    from moe_mpi.layout import Layout

    s = tiny_shape(experts=4, top_k=1)
    _, _, expert, _ = _hand_parts(s)
    # Expert 0 split over both ranks, 1 and 2 whole on rank 0, 3 whole on rank 1; every token to expert 0:
    # each rank reads half of expert 0.
    hot = pm.Routing.from_counts([[1, 0, 0, 0]], 4)
    mixed = Layout(2, ((), (0,), (0,), (1,)))
    p = pm.predict(s, "auto", [READER] * 2, LINK, 8, routing=hot, layouts=[mixed])
    assert p.parts["experts"] == pytest.approx(expert / 2)
    # Expert 0 held whole by both ranks: one of them computes all its rows, the other nothing.
    both = Layout(2, ((0, 1), (0,), (1,), (1,)))
    assert pm.predict(s, "auto", [READER] * 2, LINK, 8, routing=hot, layouts=[both]).parts["experts"] == pytest.approx(expert)
    # Memory: rank 0 holds experts 1 and 2 and half of 0; rank 1 expert 3 and half of 0.
    dense = s.attention_bytes + s.router_bytes + s.lm_head_bytes + s.embedding_bytes + s.norm_bytes
    assert pm.memory_per_rank(s, "auto", 2, 0, [mixed]) == pytest.approx([dense + 2.5 * s.expert_bytes, dense + 1.5 * s.expert_bytes])
    with pytest.raises(pm.PerfModelError, match="needs one owner per expert"):
        pm.predict(s, "central", [READER] * 2, LINK, 1, layouts=[mixed])


def test_auto_splits_a_hot_expert_and_beats_ep():
    """Mode auto takes moe_mpi.balance's layout: with one expert taking most of the slots it is split,
    and the busiest rank reads less than under ep's contiguous placement."""
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    hot = pm.Routing.from_counts([[50] + [1] * 15] * s.moe_layers, 16)
    layouts = pm.default_layouts(s, "auto", 2, hot)
    assert 0 in layouts[0].split
    auto = pm.predict(s, "auto", [READER] * 2, LINK, 8, routing=hot, layouts=layouts)
    ep = pm.predict(s, "ep", [READER] * 2, LINK, 8, routing=hot)
    assert auto.parts["experts"] < 0.95 * ep.parts["experts"]  # 0.92 here: reading-bound, a hot expert costs one read


def test_memory_per_rank_by_hand():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))
    dense = 8 * (s.attention_bytes + s.router_bytes) + s.lm_head_bytes + s.embedding_bytes + s.norm_bytes
    ep = pm.memory_per_rank(s, "ep", 2, kv_tokens=100)
    assert ep == pytest.approx([dense + 8 * 8 * s.expert_bytes + 100 * s.kv_bytes_per_token] * 2)
    central = pm.memory_per_rank(s, "central", 2, 0)
    assert central[1] == pytest.approx(8 * 8 * s.expert_bytes)  # a worker holds experts only
    tp = pm.memory_per_rank(s, "mlx-lm-tp", 2, 0)
    assert tp[0] == pytest.approx(dense - 4 * s.attention_bytes + 8 * 8 * s.expert_bytes)
    heads = pm.memory_per_rank(s, "ep+heads", 2, kv_tokens=100)  # half the attention and KV cache
    assert heads == pytest.approx([dense - 4 * s.attention_bytes + 8 * 8 * s.expert_bytes + 50 * s.kv_bytes_per_token] * 2)


# ------------------------------------------------------------------ profiles


def test_profile_round_trip_and_malformed_profiles(tmp_path):
    m = Machine("cal", 2**34, 2e10, 3e10, kernels={"float32": KernelTable((1, 8), (1e-10, 2e-10))},
                layer_seconds={"numpy/decode": 1e-4})
    link = Link("shm", 1e-6, 1e10, allreduce={"mpi4py-numpy": AllReduceFit(2e-6, 1e9, 2, (1e3, 1e4), (3e-6, 9e-6))})
    path = tmp_path / "p.json"
    write_profile(path, m, link, {"ranks": 2})
    m2, link2, meta = read_profile(path)
    assert m2 == m and link2 == link and meta == {"ranks": 2}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        read_profile(bad)
    data = json.loads(path.read_text())
    data["machine"]["bandwidth"] = -1
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="bandwidth must be a positive number"):
        read_profile(bad)
    del data["machine"]["name"]
    data["machine"]["bandwidth"] = 1.0
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="malformed machine or link"):
        read_profile(bad)


# ------------------------------------------------------------------ moe-mpi plan


def _plan(*argv):
    return subprocess.run([sys.executable, "-m", "moe_mpi", "plan", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_plan_dbrx_on_four_m2_ultras(capsys):
    assert plan_main(["--model", "dbrx", "--machines", "m2-ultra-192:4", "--link", "10gbe,tb5-rdma",
                      "--price", "m2-ultra-192=6599", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 2 * 6 * 4  # links x modes (ep, sliced, auto, auto+heads, central, mlx-lm-tp) x N
    one = [r for r in rows if r["ranks"] == 1]
    # 132B bfloat16 weights (246 GiB) do not fit in 3/4 of 192 GiB; two machines do.
    assert all(not r["fits"] and r["memory_bytes"] > 240 * 2**30 for r in one)
    by = {(r["link"], r["mode"], r["ranks"]): r for r in rows}
    # DBRX's 8 KV heads do not split over 3: mlx-lm's tensor parallel cannot run there.
    assert "kv_heads=8" in by["10gbe", "mlx-lm-tp", 3]["skipped"]
    assert all(r["fits"] for r in rows if r["ranks"] >= 2 and "skipped" not in r)
    # The one-all-reduce modes spend less of their time on a slow link than tensor parallel's two.
    assert by["10gbe", "sliced", 4]["decode_comm_share"] < by["10gbe", "mlx-lm-tp", 4]["decode_comm_share"]
    assert by["tb5-rdma", "ep", 4]["decode_comm_share"] < by["10gbe", "ep", 4]["decode_comm_share"]
    # Splitting the attention pays only where the second all-reduce is cheap: over RDMA, not 10 GbE.
    assert by["tb5-rdma", "auto+heads", 4]["decode_tokens_per_s"] > by["tb5-rdma", "auto", 4]["decode_tokens_per_s"]
    assert by["10gbe", "auto+heads", 4]["decode_tokens_per_s"] < by["10gbe", "auto", 4]["decode_tokens_per_s"]
    cost = by["10gbe", "ep", 2]
    per_hour = 2 * 6599 / (3 * 365 * 24)
    assert cost["usd_per_million_tokens"] == pytest.approx(per_hour / (cost["decode_tokens_per_s"] * 3600) * 1e6)


def test_plan_text_for_a_model_that_does_not_fit(tmp_path):
    proc = _plan("--model", "mixtral-8x22b", "--machines", "m2-max-32:2", "--link", "tb5-tcp",
                 "--plot", str(tmp_path / "p.png"))
    assert proc.returncode == 0, proc.stderr
    assert "# best on tb5-tcp: no mode fits" in proc.stdout
    assert " NO " in proc.stdout and " yes " not in proc.stdout
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "dbrx", "--machines", "m9-max-1:2", "--link", "10gbe"], "unknown machine 'm9-max-1'"),
    (["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "carrier-pigeon"], "unknown link 'carrier-pigeon'"),
    (["--model", "dbrx", "--machines", "m2-ultra-192:2"], "give --link"),
    (["--model", "no/such-model-here", "--machines", "m2-ultra-192:2", "--link", "10gbe"], "not a local directory"),
    (["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "10gbe", "--price", "m2-ultra-192=free"], "NAME=USD"),
    # These printed a header and no rows, with exit status 0.
    (["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", ","], "--link ',' names no link"),
    (["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "10gbe", "--modes", ","], "--modes ',' names no mode"),
    (["--model", "dbrx", "--machines", "m2-ultra-192:2", "--link", "10gbe", "--json", "/"], "--json / is a directory"),
])
def test_plan_bad_input_is_one_clear_error(argv, message):
    proc = _plan(*argv)
    assert proc.returncode == 1
    assert proc.stderr.count("moe-mpi: error:") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_rejects_a_malformed_profile_and_a_dense_model(tmp_path):
    bad = tmp_path / "calib.json"
    bad.write_text(json.dumps({"version": 1, "machine": {"name": "x"}, "link": {}}))
    proc = _plan("--model", "dbrx", "--profile", str(bad))
    assert proc.returncode == 1 and "malformed machine or link" in proc.stderr, proc.stderr
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "vocab_size": 100}))
    proc = _plan("--model", str(dense), "--machines", "m2-max-96:2", "--link", "10gbe")
    assert proc.returncode == 1 and "has no MoE layers" in proc.stderr, proc.stderr


def test_plan_reads_routing_statistics(tmp_path, capsys):
    """--stats: a moe-mpi profile file skews the draws and auto's layouts; one for another model is an error."""
    from moe_mpi.routing import RoutingStats

    stats = RoutingStats([16] * 8)
    for layer in range(8):
        stats(layer, np.array([[0, 1, 2, 3]] * 30 + [[4, 5, 6, 7]] * 10))  # experts 0-3 hot, all on rank 0 under ep
    stats.save(tmp_path / "stats.json")
    argv = ["--model", "dbrx-like", "--machines", "m2-ultra-64:2", "--link", "tb5-rdma", "--modes", "ep,auto", "--json", "-"]
    assert plan_main(argv) == 0
    uniform = {(r["mode"], r["ranks"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert plan_main(argv + ["--stats", str(tmp_path / "stats.json")]) == 0
    skewed = {(r["mode"], r["ranks"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    # ep: rank 0 owns every hot expert and reads them all; auto spreads them.
    assert skewed["ep", 2]["decode_tokens_per_s"] < uniform["ep", 2]["decode_tokens_per_s"]
    assert skewed["auto", 2]["decode_tokens_per_s"] > skewed["ep", 2]["decode_tokens_per_s"]
    RoutingStats([8] * 8).save(tmp_path / "other.json")
    proc = _plan(*argv[:-2], "--stats", str(tmp_path / "other.json"))
    assert proc.returncode == 1 and "MoE layers of [8] experts" in proc.stderr, proc.stderr


def test_tensor_parallel_needs_divisible_heads():
    s = pm.ModelShape.from_config(synthetic_config("dbrx-like"))  # 12 heads, 6 KV heads
    assert pm.predict(s, "mlx-lm-tp", [READER] * 3, LINK, 1).seconds > 0
    with pytest.raises(pm.PerfModelError, match="kv_heads=6 .* not over 4 ranks"):
        pm.predict(s, "mlx-lm-tp", [READER] * 4, LINK, 1)


def test_the_validation_and_paper_scripts_the_docs_cite_still_run(tmp_path):
    """docs/perfmodel.md's tables and plot come from these; they read committed JSON (no MPI)."""
    run = REPO / "docs" / "results" / "perfmodel" / "n2-decode-q4"
    png = tmp_path / "validation.png"
    proc = subprocess.run([sys.executable, "examples/perfmodel_validate.py", "--run", str(run), "--plot", str(png)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "# 10 rows: median |error|" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, "examples/perfmodel_paper.py"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("cannot run") == 2  # tensor parallel on 3 nodes, 10 GbE and TB5
