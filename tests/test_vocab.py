"""The LM head split by vocabulary rows (moe_mpi/vocab.py), in one process.

The multi-rank runs against single-process mlx-lm are in
tests/test_equivalence.py (``-vocab`` cases); here: which rows each rank
takes, that every architecture's head is found by its shape (or the model is
its tied embedding's ``as_linear`` split instead), and
that the rows of every rank, joined, give the whole head's logits (to float32
rounding: the same dot products, blocked as a BLAS blocks a narrower matrix).
"""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moe_mpi import synthetic
from moe_mpi.vocab import (
    VocabParallelEmbedding, VocabParallelHead, find_lm_head, find_tied_embedding, split_lm_head, vocab_rows,
)

from configs import EXTRA_CONFIGS


@pytest.mark.parametrize(
    "vocab, size, weights, expected",
    [
        (512, 2, None, [(0, 256), (256, 512)]),
        (10, 3, None, [(0, 4), (4, 7), (7, 10)]),
        (512, 2, [3, 1], [(0, 384), (384, 512)]),
    ],
)
def test_vocab_rows(vocab, size, weights, expected):
    got = [vocab_rows(vocab, r, size, weights) for r in range(size)]
    assert got == expected
    assert got[0][0] == 0 and got[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # contiguous, no row twice


class Joined:
    """A communicator of one rank out of ``size`` whose all-gather records the part and returns it."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size
        self.parts = []

    def all_gather(self, x, sizes):
        self.parts.append(x)
        return x


CONFIGS = {arch: synthetic.tiny_config(arch) for arch in synthetic.ARCHITECTURES}
CONFIGS.update(EXTRA_CONFIGS)


@pytest.mark.parametrize("quantize", [None, 4])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_rows_join_to_the_whole_head(arch, quantize):
    """Each architecture: the head is found by shape, and 3 ranks' rows joined equal its logits (to rounding)."""
    config = CONFIGS[arch]
    whole, _ = synthetic.build_model(config, seed=1, quantize=quantize)
    found = find_lm_head(whole)
    tied = found is None
    if tied:  # the embedding is the head: only its as_linear is split
        found = find_tied_embedding(whole)
        assert found is not None, arch
    path, head, vocab = found
    assert vocab == synthetic.vocab_size(whole)
    quantized = isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    hidden = head.weight.shape[-1] * 32 // head.bits if quantized else head.weight.shape[-1]
    x = mx.random.normal((2, 3, hidden), key=mx.random.key(0))
    project = (lambda m, v: m.as_linear(v)) if tied else (lambda m, v: m(v))
    expected = np.array(project(head, x))
    parts = []
    for rank in range(3):
        model, _ = synthetic.build_model(config, seed=1, quantize=quantize)
        comm = Joined(rank, 3)
        plan, got_path = split_lm_head(model, comm, arch)
        assert got_path == path and all(k.startswith(path + ".") for k in plan)
        part_head = dict(model.named_modules())[path]
        start, stop = vocab_rows(vocab, rank, 3)
        if tied:  # kept whole for the lookup, which is unchanged
            assert isinstance(part_head, VocabParallelEmbedding) and not plan
            assert part_head.weight.shape[0] == vocab
            ids = mx.array([[0, vocab - 1]])
            assert mx.array_equal(part_head(ids), head(ids)).item()
        else:
            assert isinstance(part_head, VocabParallelHead)
            assert part_head.weight.shape[0] == stop - start
        out = project(part_head, x)
        assert out.shape[-1] == stop - start  # Joined hands back this rank's part
        parts.append(np.array(comm.parts[-1]))
    # The same dot products; a BLAS may block a narrower matrix differently, so to float32 rounding.
    np.testing.assert_allclose(np.concatenate(parts, axis=-1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, 4])
def test_tied_embedding_splits_its_work_not_its_rows(quantize):
    """qwen3_moe with tie_word_embeddings: no separate head; the embedding's as_linear is split."""
    config = synthetic.tiny_config("qwen3_moe", tie_word_embeddings=True)
    model, _ = synthetic.build_model(config, seed=1, quantize=quantize)
    assert find_lm_head(model) is None
    path, embedding, vocab = find_tied_embedding(model)
    plan, got = split_lm_head(model, Joined(1, 2), "qwen3_moe")
    assert got == path and plan == {} and isinstance(embedding, VocabParallelEmbedding)


def test_a_model_with_no_head_or_embedding_is_refused():
    """Two embeddings as wide outside the layers and no head: which one makes the logits is not known."""
    config = synthetic.tiny_config("qwen3_moe", tie_word_embeddings=True)
    model, _ = synthetic.build_model(config, seed=1)
    model.extra = nn.Embedding(8, config["hidden_size"])
    with pytest.raises(ValueError, match=r"lm_head='split': model_type='qwen3_moe' has no linear layer .*replicated"):
        split_lm_head(model, SimpleNamespace(rank=0, size=2), "qwen3_moe")


def test_unread_head_skips_its_gather():
    """In a prompt chunk whose logits nobody reads, the head returns the fill without gathering."""
    from moe_mpi.unread import UnreadTail

    model, _ = synthetic.build_model(CONFIGS["qwen3_moe"], seed=1)
    comm = Joined(0, 2)
    _, path = split_lm_head(model, comm, "qwen3_moe")
    head = dict(model.named_modules())[path]
    x = mx.ones((1, 2, head.weight.shape[-1]))
    with UnreadTail([head]).active(0.5):
        out = head(x)
    assert not comm.parts and out.shape == (1, 2, sum(head.vocab_rows[1]))
    assert np.all(np.array(out) == 0.5)
