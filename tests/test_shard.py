"""The sharding pass in one process: the partial-sum contract, block by block.

N rank shards of a model are built side by side with a stand-in
communicator whose all-reduce returns its input, so each MoE block returns
its rank's partial sum. Summed over ranks, the partials must equal the
unsharded block. (The real multi-rank runs are in test_equivalence.py.)
"""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi.loading import model_classes
from moe_mpi import ExpertPlacement, cpu, shard_experts
from moe_mpi.shard import NoOutput, find_moe_blocks, shard_structure
from moe_mpi.synthetic import ARCHITECTURES, build_model, tiny_config, vocab_size

from configs import EXTRA_CONFIGS, REFUSED_CONFIGS


class LocalComm:
    """One rank of a simulated group: all_sum returns the partial sum."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.calls = rank, size, 0

    def all_sum(self, x):
        self.calls += 1
        return x


CONFIGS = {arch: tiny_config(arch) for arch in ARCHITECTURES} | EXTRA_CONFIGS


def _model(config: dict, quantize=None) -> nn.Module:
    model, _ = build_model(config, seed=3, quantize=quantize)
    mx.eval(model.parameters())
    return model


def _rank_models(config, size, quantize=None, **kw):
    """The ``size`` rank shards of a model, each with its LocalComm."""
    models = []
    for rank in range(size):
        model = _model(config, quantize)
        comm = LocalComm(rank, size)
        shard_structure(model, comm, **kw)
        mx.eval(model.parameters())
        cpu.accelerate(model)  # the CPU expert kernels (nothing on Metal)
        models.append((model, comm))
    return models


def _block_calls(model, seed=0, tokens=9):
    """Each MoE block's arguments, ``(args, kwargs)`` in layer order, in a forward pass of
    ``tokens`` random tokens: the blocks' real inputs, whatever they take (gemma4_text's
    and deepseek_v41's blocks also take the routing, from their caller). 9 tokens:
    experts with one row and with several, on any rank count; 1 token: decode."""
    blocks = find_moe_blocks(model)
    calls = {}

    def capturing(cls, i):
        class Capture(cls):
            def __call__(self, *args, **kwargs):
                calls.setdefault(i, (args, kwargs))  # [1, tokens, D] hidden states first
                return super().__call__(*args, **kwargs)

        return Capture

    classes = [type(b.block) for b in blocks]
    for i, b in enumerate(blocks):
        b.block.__class__ = capturing(classes[i], i)
    try:
        ids = np.random.default_rng(seed).integers(0, vocab_size(model), (1, tokens))
        mx.eval(model(mx.array(ids)))
    finally:
        for b, cls in zip(blocks, classes):
            b.block.__class__ = cls
    return [calls[i] for i in range(len(blocks))]


def _block_inputs(model, seed=0, tokens=9):
    # The blocks' own inputs: [1, tokens, D] activations. 9 tokens: experts
    # with one row and with several, on any rank count; 1 token: decode.
    hidden = model.args.hidden_size if hasattr(model.args, "hidden_size") else model.args.d_model
    return mx.random.normal((1, tokens, hidden), key=mx.random.key(seed))


# Expert kernels (MOE_MPI_EXPERT_KERNEL, MOE_MPI_DENSE_MIN_ROWS,
# MOE_MPI_NUMPY_KERNELS, MOE_MPI_NUMPY_MAX_ROWS): every expert through BLAS
# matmuls; the default (float experts with up to 4 rows through numpy's
# sgemv, the rest through BLAS); one-row experts through gather_mm instead;
# the switch layer's own call.
KERNELS = {
    "dense": ("dense", "1", "1", "0"),
    "hybrid": ("dense", "2", "1", "4"),
    "hybrid-gather": ("dense", "2", "0", "4"),
    "gather": ("gather", "2", "1", "4"),
}


# The kernels differ by architecture only in the experts' activation: the
# architectures of EXTRA_CONFIGS run the default ("hybrid": numpy, matmuls and
# gather_mm in one call) and the switch layer's own call, to keep the suite short.
EXTRA_KERNELS = ("gather", "hybrid")
ARCH_KERNELS = [(a, k) for a in sorted(CONFIGS) for k in sorted(KERNELS) if a in ARCHITECTURES or k in EXTRA_KERNELS]


@pytest.mark.parametrize("tokens", [9, 1])
@pytest.mark.parametrize("quantize", [None, 4])
@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("arch, kernel", ARCH_KERNELS)
def test_partial_sums_add_up_to_the_block(arch, kernel, size, quantize, tokens, monkeypatch):
    """Every kernel, for prefill-like (9 tokens) and decode (1 token) input;
    one float token with the numpy kernels on takes the all-numpy path."""
    monkeypatch.setenv("MOE_MPI_EXPERT_KERNEL", KERNELS[kernel][0])
    monkeypatch.setenv("MOE_MPI_DENSE_MIN_ROWS", KERNELS[kernel][1])
    monkeypatch.setenv("MOE_MPI_NUMPY_KERNELS", KERNELS[kernel][2])
    monkeypatch.setenv("MOE_MPI_NUMPY_MAX_ROWS", KERNELS[kernel][3])
    config = CONFIGS[arch]
    ref = _model(config, quantize)
    from moe_mpi.adapters import convert_blocks

    convert_blocks(ref)  # dbrx: the stacked equivalent of its block
    calls = _block_calls(ref, tokens=tokens)
    expected = [b.block(*args, **kwargs) for b, (args, kwargs) in zip(find_moe_blocks(ref), calls)]
    ranks = _rank_models(config, size, quantize)
    partials = [[b.block(*a, **kw) for b, (a, kw) in zip(find_moe_blocks(m), calls)] for m, _ in ranks]
    for i, want in enumerate(expected):
        got = sum(p[i] for p in partials)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    for model, comm in ranks:  # one all-reduce per MoE block per call
        assert comm.calls == len(expected)
        assert all(b.switch.cpu_kernels.kernel == KERNELS[kernel][0] for b in find_moe_blocks(model))


@pytest.mark.parametrize("quantize, kernel", [(None, "dense"), (4, "gather")])
def test_default_expert_kernel_by_weight_format(quantize, kernel, monkeypatch):
    """Float experts get one BLAS matmul per expert; quantized ones stay on gather_qmm."""
    monkeypatch.delenv("MOE_MPI_EXPERT_KERNEL", raising=False)
    for model, _ in _rank_models(CONFIGS["qwen3_moe"], 2, quantize):
        kinds = {b.switch.cpu_kernels.kernel for b in find_moe_blocks(model)}
        assert kinds == {kernel}, kinds


def test_experts_are_stacked_and_split_by_placement():
    config = CONFIGS["mixtral"]
    placement = ExpertPlacement.weighted(8, [2, 1, 1])
    for (model, _), rank in zip(_rank_models(config, 3, placement=placement), range(3)):
        local = placement.local_experts(rank)
        for b in find_moe_blocks(model):
            assert b.switch.expert_shard.experts == local
            assert b.switch.gate_proj.weight.shape[0] == len(local)  # one stacked tensor
        assert model.ep_info.placements == (placement,)


def test_shared_expert_split_along_intermediate():
    config = CONFIGS["qwen2_moe"]
    inter = config["shared_expert_intermediate_size"]
    rows = []
    for model, _ in _rank_models(config, 2):
        shared = find_moe_blocks(model)[0].block.shared_expert
        rows.append(shared.gate_proj.weight.shape[0])
        assert shared.down_proj.weight.shape[1] == shared.gate_proj.weight.shape[0]
    assert sum(rows) == inter and max(rows) - min(rows) <= 1


def test_unsplittable_shared_expert_has_one_owner():
    # 4-bit, group 32: a 64-wide shared expert has 2 groups, so 3 ranks cannot
    # split it; exactly one rank computes it.
    config = tiny_config("qwen2_moe", shared_expert_intermediate_size=64)
    owners = [
        not isinstance(find_moe_blocks(m)[0].block.shared_expert, NoOutput)
        for m, _ in _rank_models(config, 3, quantize=4)
    ]
    assert sum(owners) == 1


def test_dense_model_is_rejected():
    config = dict(
        model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64, num_key_value_heads=2,
    )
    model_class, args_class = model_classes(config)
    with pytest.raises(ValueError, match="model_type='llama' has no MoE block"):
        shard_structure(model_class(args_class.from_dict(config)), LocalComm(0, 2))


@pytest.mark.parametrize("arch", sorted(REFUSED_CONFIGS))
def test_block_not_linear_in_its_experts_is_refused(arch):
    """A block whose ranks' partial outputs would not add up to it is refused on
    2 ranks, naming the architecture, the block and the reason; the probe leaves
    the block as it was. One rank, and mode='central', run such blocks whole."""
    config, reason = REFUSED_CONFIGS[arch]
    model = _model(config)
    classes = [(type(b.block), type(b.switch)) for b in find_moe_blocks(model)]
    with pytest.raises(ValueError, match=f"model_type='{config['model_type']}': its MoE block .*{re.escape(reason)}.*num_ranks=2"):
        shard_structure(model, LocalComm(0, 2))
    assert [(type(b.block), type(b.switch)) for b in find_moe_blocks(model)] == classes
    assert not any("probe" in b.switch.__dict__ for b in find_moe_blocks(model))
    shard_structure(_model(config), LocalComm(0, 1))
    shard_structure(_model(config), LocalComm(1, 2), mode="central")


@pytest.mark.parametrize("arch", ["longcat_flash", "nemotron_h"])
def test_term_without_experts_is_kept_by_one_rank(arch):
    """Identity experts (longcat_flash) or a bias after the experts (nemotron_h):
    the rank with the most whole experts keeps that term, the others take it off
    (the partial sums adding up is test_partial_sums_add_up_to_the_block)."""
    for size in (2, 3):
        ranks = _rank_models(CONFIGS[arch], size)
        for i in range(len(find_moe_blocks(ranks[0][0]))):
            keep = ["expert_free_elsewhere" not in find_moe_blocks(m)[i].block.__dict__ for m, _ in ranks]
            assert keep == [True] + [False] * (size - 1), keep  # contiguous: rank 0 has most experts
    one = _rank_models(CONFIGS["qwen2_moe"], 2)
    assert not any("expert_free_elsewhere" in b.block.__dict__ for m, _ in one for b in find_moe_blocks(m))


def test_more_ranks_than_experts_names_the_numbers():
    with pytest.raises(ValueError, match="num_experts=8 is less than num_ranks=9"):
        shard_structure(_model(CONFIGS["mixtral"]), LocalComm(0, 9))


def test_placement_for_another_model_is_rejected():
    with pytest.raises(ValueError, match="num_experts=6.*num_experts=8"):
        shard_structure(_model(CONFIGS["mixtral"]), LocalComm(0, 2), ExpertPlacement.contiguous(6, 2))


def test_sharding_twice_is_rejected():
    model = _model(CONFIGS["mixtral"])
    shard_experts(model, LocalComm(0, 1))
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(model, LocalComm(0, 1))


@pytest.mark.parametrize("quantize", [None, 4])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "dbrx"])
def test_sliced_mode_partial_sums(arch, size, quantize):
    """mode='sliced': every rank a slice of every expert; still one all-reduce."""
    config = CONFIGS[arch]
    if quantize and size == 3:  # 64 units in 32-groups cannot go to 3 ranks
        with pytest.raises(ValueError, match="mode='sliced' needs"):
            _rank_models(config, size, quantize, mode="sliced")
        return
    ref = _model(config, quantize)
    from moe_mpi.adapters import convert_blocks

    convert_blocks(ref)
    x = _block_inputs(ref)
    expected = [b.block(x) for b in find_moe_blocks(ref)]
    ranks = _rank_models(config, size, quantize, mode="sliced")
    for i, want in enumerate(expected):
        got = sum(b.block(x) for m, _ in ranks for b in find_moe_blocks(m)[i : i + 1])
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    inter = {m.switch.gate_proj.weight.shape[1] for r, _ in ranks for m in find_moe_blocks(r)}
    assert max(inter) * size >= config.get("moe_intermediate_size", 64) > min(inter)
    for model, comm in ranks:
        assert comm.calls == len(expected)


# ----------------------------------------------------------------- layouts
# Per-layer layouts: experts whole on one rank, replicated, or split, mixed
# in one layer; every slot is computed once (or as slices that sum to it).


def _mixed_layouts(num_experts: int, size: int, layers: int):
    """A different mixed layout per layer: the first two experts split, the
    third replicated on every rank, the rest one owner each (round robin,
    shifted by layer)."""
    from moe_mpi.layout import Layout

    layouts = []
    for layer in range(layers):
        holders = [(), (), tuple(range(size))]
        holders += [((e + layer) % size,) for e in range(3, num_experts)]
        layouts.append(Layout(size, tuple(holders)))
    return layouts


@pytest.mark.parametrize("tokens", [9, 1])
@pytest.mark.parametrize("quantize", [None, 4])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "dbrx", "qwen2_moe"])
def test_mixed_layouts_partial_sums(arch, size, quantize, tokens):
    """Split, replicated and single-owner experts in one layer, a different
    layout per layer: the ranks' partial sums add up to the block, with one
    all-reduce per layer."""
    config = CONFIGS[arch]
    ref = _model(config, quantize)
    from moe_mpi.adapters import convert_blocks

    convert_blocks(ref)
    blocks = find_moe_blocks(ref)
    n = blocks[0].num_experts
    layouts = _mixed_layouts(n, size, len(blocks))
    if quantize and size == 3:  # intermediate 64 in 32-groups: no 3 slices
        with pytest.raises(ValueError, match="to split experts"):
            _rank_models(config, size, quantize, mode="auto", layouts=layouts)
        return
    x = _block_inputs(ref, tokens=tokens)
    expected = [b.block(x) for b in blocks]
    ranks = _rank_models(config, size, quantize, mode="auto", layouts=layouts)
    for i, want in enumerate(expected):
        got = sum(find_moe_blocks(m)[i].block(x) for m, _ in ranks)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    for (model, comm), rank in zip(ranks, range(size)):
        assert comm.calls == len(expected)
        switch = find_moe_blocks(model)[0].switch
        assert switch.expert_shard.experts == layouts[0].whole_on(rank)
        assert switch.split.expert_shard.experts == (0, 1)  # the split experts' slices
        assert model.ep_info.layouts == tuple(layouts)


def test_layout_validation_and_assignment():
    from moe_mpi.layout import SPLIT, Layout, assign_slots, rank_loads

    with pytest.raises(ValueError, match="rank 1 holds no expert"):
        Layout(2, ((0,), (0,)))
    with pytest.raises(ValueError, match="out of range"):
        Layout(2, ((0,), (2,)))
    with pytest.raises(ValueError, match="names a rank twice"):
        Layout(2, ((0, 0), (1,)))
    layout = Layout(2, ((), (0,), (1,), (0, 1)))  # expert 0 split, 3 replicated
    assert layout.split == (0,) and layout.replicated == (3,) and layout.whole_on(0) == (1, 3)
    # Expert 1 (2 rows) on rank 0: the replicated expert 3 goes to rank 1.
    flat = np.array([1, 3, 1, 0, 3, 2])
    assert assign_slots(layout, flat).tolist() == [0, 1, 0, SPLIT, 1, 1]
    assert rank_loads(layout, flat).tolist() == [2.5, 3.5]
    # One row: to the lower of two idle holders. Two rows: one each, since under the default
    # price (1 + m/16 reads) that makes the busier holder's work 17/16 instead of 18/16.
    assert assign_slots(layout, np.array([3])).tolist() == [0]
    assert assign_slots(layout, np.array([3, 3])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="'sliced' splits every expert"):
        _rank_models(CONFIGS["mixtral"], 2, mode="sliced", layouts=_mixed_layouts(8, 2, 2))
    with pytest.raises(ValueError, match="3 layouts for 2 MoE layers"):
        _rank_models(CONFIGS["qwen3_moe"], 2, mode="auto", layouts=_mixed_layouts(8, 2, 3))


def test_auto_mode_chooses_and_stays_exact():
    """mode='auto' with no statistics (uniform routing) and with skewed ones:
    a layout per layer, and the partial sums still add up."""
    from moe_mpi.routing import RoutingStats

    config = CONFIGS["qwen3_moe"]
    ref = _model(config)
    blocks = find_moe_blocks(ref)
    stats = RoutingStats([b.num_experts for b in blocks])
    hot = np.array([[0, 1]] * 30 + [[2, 3]] * 2)  # experts 0 and 1 take most slots
    for layer in range(len(blocks)):
        stats(layer, hot)
    x = _block_inputs(ref)
    expected = [b.block(x) for b in blocks]
    both = {"stats": stats, "replicas": 2}
    for kw in ({}, {"stats": stats}, both, dict(both, balance="replicate"), dict(both, balance="split")):
        ranks = _rank_models(config, 2, mode="auto", **kw)
        for i, want in enumerate(expected):
            got = sum(find_moe_blocks(m)[i].block(x) for m, _ in ranks)
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
        layouts = ranks[0][0].ep_info.layouts
        assert len(layouts) == len(blocks) and all(l.num_ranks == 2 for l in layouts)


def test_warm_up_picks_least_recently_used_idle_experts():
    from moe_mpi.warmup import WarmUp

    warm = WarmUp(5)
    assert warm.choose([1, 3], 2).tolist() == [0, 2]  # never used: lowest index first
    assert warm.choose([0], 3).tolist() == [4, 1, 2]  # 4 never used; then those last used at step 1
    assert warm.choose([], 0).tolist() == []
    assert warm.pads == 5


def test_warm_up_never_changes_the_output(monkeypatch):
    """Forced on the CPU (it is a Metal option): ranks pad their steps with
    idle experts, and the partial sums are exactly what they were."""
    from moe_mpi.warmup import use_warm_experts

    monkeypatch.setenv("MOE_MPI_CPU", "0")  # the switch layers' own path, where the pad runs
    config = CONFIGS["mixtral"]
    x = _block_inputs(_model(config), tokens=3)
    plain = _rank_models(config, 2)
    warmed = _rank_models(config, 2)
    assert all(use_warm_experts(m, force=True) == 2 for m, _ in warmed)
    for step in range(3):
        for (a, _), (b, _) in zip(plain, warmed):
            for block_a, block_b in zip(find_moe_blocks(a), find_moe_blocks(b)):
                np.testing.assert_array_equal(np.array(block_a.block(x)), np.array(block_b.block(x)))
    pads = [s.warm_up.pads for m, _ in warmed for s in (b.switch for b in find_moe_blocks(m))]
    assert sum(pads) > 0, pads


def test_auto_mode_weighs_the_experts_width():
    """Thin slices cost more per row: 64-wide experts stay whole, 4096-wide ones are split."""
    narrow = _rank_models(CONFIGS["qwen3_moe"], 2, mode="auto")
    wide = _rank_models({**CONFIGS["qwen3_moe"], "moe_intermediate_size": 4096}, 2, mode="auto")
    assert not any(layout.split for layout in narrow[0][0].ep_info.layouts)
    assert all(len(layout.split) == layout.num_experts for layout in wide[0][0].ep_info.layouts)


def test_auto_balance_split_copy_or_the_cheaper():
    """balance='split' never copies, 'replicate' never splits, 'both' costs no more than either
    (by the cost model it is chosen with, on the same draws)."""
    from moe_mpi import balance

    p = np.array([0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])
    for n in (2, 3):
        chosen = {b: balance.auto_layout(p, 2, n, replicas=2, intermediate=1024, balance=b) for b in balance.BALANCE_CHOICES}
        assert chosen["split"].split and not chosen["split"].replicated, chosen["split"].describe()
        assert chosen["replicate"].replicated and not chosen["replicate"].split, chosen["replicate"].describe()
        # Copies go to the hot experts.
        assert set(chosen["replicate"].replicated) <= {0, 1, 2}, chosen["replicate"].replicated
        cost = {b: balance.layout_cost(layout, p, 2, intermediate=1024) for b, layout in chosen.items()}
        assert cost["both"] <= min(cost["split"], cost["replicate"]) + 1e-9, cost
    # With no budget, 'replicate' is a placement by the statistics; 'split' ignores a budget.
    assert not balance.auto_layout(p, 2, 2, replicas=0, intermediate=1024, balance="replicate").replicated
    assert not balance.auto_layout(p, 2, 2, replicas=4, intermediate=1024, balance="split").replicated
    with pytest.raises(ValueError, match="expected one of split, replicate, both"):
        balance.auto_layout(p, 2, 2, balance="copy")
    with pytest.raises(ValueError, match="8 experts cannot cover 9 ranks"):
        balance.auto_layout(p, 2, 9, replicas=2, balance="replicate")


@pytest.mark.parametrize("quantize, fmt", [(None, "float32"), (4, "q4")])
@pytest.mark.parametrize("size", [2, 3])
def test_auto_mode_priced_by_a_profile(quantize, fmt, size, monkeypatch):
    """load(mode="auto", profile=...): every layout carries the price of the model's weight format,
    a copied expert's rows are shared among its holders, and the partial sums still add up."""
    import moe_mpi.experts
    from moe_mpi.layout import assign_slots
    from moe_mpi.routing import RoutingStats

    # Every row a full read in 4-bit, rows cheap in float32: the tables say which was used.
    tables = {
        "float32/expert": {"rows": [1, 2, 16], "seconds_per_byte": [1.0, 1.2, 5.0]},
        "q4/expert": {"rows": [1, 2, 16], "seconds_per_byte": [1.0, 2.0, 16.0]},
    }
    profile = {"machine": {"kernels": tables}}
    config = CONFIGS["qwen3_moe"]
    ref = _model(config, quantize)
    blocks = find_moe_blocks(ref)
    stats = RoutingStats([b.num_experts for b in blocks])
    for layer in range(len(blocks)):
        stats(layer, np.array([[0, 1]] * 30 + [[2, 3]] * 4 + [[4, 5]] * 2 + [[6, 7]] * 2))
    x = _block_inputs(ref, tokens=24)
    expected = [b.block(x) for b in blocks]
    shared = []

    def watch(layout, flat):
        ranks = assign_slots(layout, flat)
        shared.extend(len(set(ranks[flat == e].tolist())) > 1 for e in layout.replicated)
        return ranks

    monkeypatch.setattr(moe_mpi.experts, "assign_slots", watch)
    ranks = _rank_models(config, size, quantize, mode="auto", stats=stats, replicas=2, balance="replicate",
                         profile=profile)
    for i, want in enumerate(expected):
        got = sum(find_moe_blocks(m)[i].block(x) for m, _ in ranks)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    layouts = ranks[0][0].ep_info.layouts
    assert all(l.replicated and l.row_cost.source == f"calibrate {fmt}/expert" for l in layouts), layouts
    assert any(shared), "no replicated expert's rows were shared: the case checks nothing"
    assert all(m.ep_info.layouts == layouts for m, _ in ranks)
