"""Prompt chunks leave out the work nobody reads (moe_mpi.unread), and only that work.

The multi-rank side (every architecture, mode and placement on 1, 2 and 3
ranks, through mlx-lm's BatchGenerator) is in tests/mpi_equivalence.py; the
serve engine's count in tests/test_serve.py. Here, on one rank: which
modules the probe keeps, and that a skipped call leaves every cache as a
full call does.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from moe_mpi import Communicator, shard_experts, synthetic
from moe_mpi.unread import UnreadTail, find_unread_tail, skip_unread_prefill

PROMPT = mx.array([[5, 9, 2, 7, 1, 3]])


def _model(attention="replicated", **overrides):
    config = synthetic.tiny_config("qwen3_moe", num_hidden_layers=3, **overrides)
    model, _ = synthetic.build_model(config, seed=2)
    mx.eval(model.parameters())
    return shard_experts(model, Communicator(), attention=attention)


def _states(cache):
    states = [v for c in cache for _, v in tree_flatten(c.state) if isinstance(v, mx.array)]
    mx.eval(states)
    return [np.array(s) for s in states]


def _kinds(tail):
    return [type(m).skip_kind for m in tail.modules]


@pytest.mark.parametrize("attention, kinds", [("replicated", ["moe"]), ("split", ["moe", "attention"])])
def test_the_last_layer_is_skipped_when_it_is_an_moe_layer(attention, kinds):
    model = _model(attention)
    tail = find_unread_tail(model)
    assert sorted(_kinds(tail)) == sorted(kinds) and tail.rejected == []
    moe_paths = [p for p, m in model.named_modules() if any(m is t for t in tail.modules)]
    assert all(p.startswith("model.layers.2.") for p in moe_paths), moe_paths


@pytest.mark.parametrize("attention", ["replicated", "split"])
def test_an_moe_layer_that_feeds_a_later_attention_is_not_skipped(attention):
    """A dense last layer: the last MoE block's output reaches layer 2's KV cache."""
    model = _model(attention, mlp_only_layers=[2])
    tail = find_unread_tail(model)
    assert [p.split(".")[:3] for p in tail.rejected] == [["model", "layers", "1"]], tail.rejected
    # The last split attention feeds only the dense MLP and the LM head: it may skip.
    assert _kinds(tail) == (["attention"] if attention == "split" else [])


@pytest.mark.parametrize("attention", ["replicated", "split"])
def test_a_skipped_call_leaves_the_caches_of_a_full_call_and_unreadable_logits(attention):
    model = _model(attention)
    tail = find_unread_tail(model)
    full_cache, skip_cache = make_prompt_cache(model), make_prompt_cache(model)
    full = model(PROMPT, cache=full_cache)
    with tail.active():
        skipped = model(PROMPT, cache=skip_cache)
    for a, b in zip(_states(full_cache), _states(skip_cache)):
        np.testing.assert_array_equal(a, b)
    # Were the output read, it would be refused as non-finite, not passed on.
    assert bool(mx.isnan(skipped).all())
    assert tail.skipped == len(tail.modules)
    # After the context, the model is whole again: the next token's logits agree.
    nxt = mx.array([[4]])
    np.testing.assert_array_equal(np.array(model(nxt, cache=full_cache)), np.array(model(nxt, cache=skip_cache)))
    assert tail.skipped == len(tail.modules)


def test_batch_generator_tokens_equal_with_and_without_the_skip():
    model = _model("split")
    tail = find_unread_tail(model)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 8], [4, 4, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]

    def run(skip):
        gen = BatchGenerator(model, prefill_step_size=4)
        assert skip_unread_prefill(gen, tail if skip else None) is skip
        uids = gen.insert(prompts, max_tokens=[6] * len(prompts))
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
        gen.close()
        return [out[uid] for uid in uids]

    before = tail.skipped
    assert run(True) == run(False)
    assert tail.skipped > before


def test_nothing_to_skip():
    assert skip_unread_prefill(object(), UnreadTail()) is False
    assert skip_unread_prefill(object(), None) is False
    plain, _ = synthetic.build_model(synthetic.tiny_config("qwen3_moe"), seed=2)
    assert find_unread_tail(plain).modules == []  # not sharded: nothing ends in an all-reduce
