"""Attention split by heads (moe_mpi/attention.py), in one process.

The multi-rank runs, against single-process mlx-lm, are in
tests/test_equivalence.py; here: which heads each rank takes, and that every
architecture mlx-lm has either splits into parts that add up to the whole
attention or is refused with a clear error, never split wrongly.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi import synthetic
from moe_mpi.attention import (
    HeadShard, NoReduce, attention_shape, check_head_split, find_attention, head_ranges, split_heads,
)
from moe_mpi.slicing import clone_structure

from configs import EXTRA_CONFIGS

#: Architectures whose attention moe_mpi refuses to split, and why.
REFUSED = {
    "deepseek_v3": "no attention moe_mpi can split",  # multi-head latent attention
    "olmoe": "not a sum over its heads",  # q_norm/k_norm over all heads at once
}


@pytest.mark.parametrize(
    "heads, kv_heads, size, weights, expected",
    [
        (12, 6, 2, None, [((0, 6), (0, 3)), ((6, 12), (3, 6))]),
        (12, 6, 4, None, [((0, 4), (0, 2)), ((4, 8), (2, 4)), ((8, 10), (4, 5)), ((10, 12), (5, 6))]),
        (12, 6, 2, [2, 1], [((0, 8), (0, 4)), ((8, 12), (4, 6))]),
        # Fewer key/value heads than ranks: a key/value head on several ranks, its queries shared.
        (4, 2, 3, None, [((0, 1), (0, 1)), ((1, 2), (0, 1)), ((2, 4), (1, 2))]),
        (8, 1, 3, None, [((0, 3), (0, 1)), ((3, 6), (0, 1)), ((6, 8), (0, 1))]),
    ],
)
def test_head_ranges(heads, kv_heads, size, weights, expected):
    assert [head_ranges(heads, kv_heads, r, size, weights) for r in range(size)] == expected


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (12, 6), (32, 8), (48, 8), (16, 1)])
@pytest.mark.parametrize("size", range(1, 9))
def test_every_query_head_once_with_the_key_value_head_it_reads(heads, kv_heads, size):
    group = heads // kv_heads
    try:
        ranges = [head_ranges(heads, kv_heads, r, size) for r in range(size)]
    except ValueError as e:
        assert size > heads or "would share one key/value head" in str(e)
        return
    taken = [h for (q0, q1), _ in ranges for h in range(q0, q1)]
    assert taken == list(range(heads))
    for (q0, q1), (k0, k1) in ranges:
        assert q1 > q0 and k1 > k0
        # The local query -> key/value mapping of grouped attention (local i reads local
        # i // (queries / kv heads)) is the global one.
        local_group, rest = divmod(q1 - q0, k1 - k0)
        assert rest == 0
        assert [k0 + i // local_group for i in range(q1 - q0)] == [(q0 + i) // group for i in range(q1 - q0)]


def test_too_few_query_heads_to_share_is_refused():
    with pytest.raises(ValueError, match=r"num_attention_heads=2, num_key_value_heads=1: 3 ranks would share"):
        head_ranges(2, 1, 0, 3)


def _model(config, **kwargs):
    model, _ = synthetic.build_model(config, seed=1, **kwargs)
    mx.eval(model.parameters())
    return model


def _probe_all(model, size):
    model_type = getattr(model, "model_type", type(model).__name__)
    found = find_attention(model)
    if not found:
        raise ValueError(f"attention split: model_type={model_type!r} has no attention moe_mpi can split by heads")
    for _, module, shape in found:
        check_head_split(model_type, module, shape, size)
    return found


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("arch", synthetic.ARCHITECTURES)
def test_named_architectures_split_or_refuse(arch, size):
    model = _model(synthetic.tiny_config(arch))
    if arch in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[arch]):
            _probe_all(model, size)
    else:
        assert len(_probe_all(model, size)) == len(model.layers)  # one attention per layer


@pytest.mark.parametrize("arch", sorted(EXTRA_CONFIGS))
def test_other_architectures_split_exactly_or_refuse_clearly(arch):
    """mlx-lm's other MoE architectures: each attention module found splits into parts
    that add up to it, or the whole model is refused with an ``attention split:`` error."""
    model = _model(EXTRA_CONFIGS[arch])
    for size in (2, 3):
        try:
            _probe_all(model, size)
        except ValueError as e:
            assert str(e).startswith("attention split:"), e


def test_parts_add_up_to_the_whole_attention():
    """The check itself, recomputed here: 3 parts of a qwen3_moe attention, summed."""
    model = _model(synthetic.tiny_config("qwen3_moe", num_attention_heads=6, num_key_value_heads=3))
    _, module, shape = find_attention(model)[0]
    x = mx.array(np.random.default_rng(1).standard_normal((2, 5, module.o_proj.weight.shape[0])).astype(np.float32))
    whole = np.array(module(x, mask="causal"))
    total = 0
    for rank in range(3):
        part = clone_structure(module)
        heads, kv_heads = head_ranges(shape.heads, shape.kv_heads, rank, 3)
        split_heads("", part, shape, HeadShard(NoReduce(), heads, kv_heads, shape.head_dim), rank)
        assert (part.n_heads, part.n_kv_heads) == (2, 1)
        assert part.q_proj.weight.shape[0] == 2 * shape.head_dim
        total = total + np.array(part(x, mask="causal"))
    np.testing.assert_allclose(total, whole, rtol=1e-5, atol=1e-5)
    assert module.n_heads == 6  # the original is untouched


def test_a_norm_over_all_heads_is_refused():
    model = _model(synthetic.tiny_config("olmoe"))
    _, module, shape = find_attention(model)[0]
    with pytest.raises(ValueError, match="olmoe's Attention is not a sum over its heads"):
        check_head_split("olmoe", module, shape, 2)


def test_quantization_groups_across_heads_are_refused():
    """4-bit output projection with groups of 32 columns, heads of 16: 3 ranks cannot take whole groups."""
    model = _model(synthetic.tiny_config("qwen3_moe"), quantize=4, group_size=32)
    _, module, shape = find_attention(model)[0]
    assert shape.head_dim == 16
    check_head_split("qwen3_moe", module, shape, 2)  # 2 heads each: whole groups
    with pytest.raises(ValueError, match="quantization groups of 32 columns; heads"):
        check_head_split("qwen3_moe", module, shape, 3)


def test_an_output_bias_is_added_once():
    """A biased output projection: rank 0 keeps the bias, the others drop it."""
    model = _model(synthetic.tiny_config("qwen3_moe"))
    _, module, shape = find_attention(model)[0]
    module.o_proj = nn.Linear(shape.heads * shape.head_dim, module.o_proj.weight.shape[0], bias=True)
    mx.eval(module.parameters())
    check_head_split("qwen3_moe", module, shape, 2)
    kept = []
    for rank in range(2):
        part = clone_structure(module)
        heads, kv_heads = head_ranges(shape.heads, shape.kv_heads, rank, 2)
        split_heads("", part, shape, HeadShard(NoReduce(), heads, kv_heads, shape.head_dim), rank)
        kept.append("bias" in part.o_proj)
    assert kept == [True, False]


def test_not_an_attention():
    assert attention_shape(nn.Linear(4, 4)) is None
    mlp = nn.Module()
    mlp.gate_proj, mlp.down_proj = nn.Linear(4, 8), nn.Linear(8, 4)
    assert attention_shape(mlp) is None
