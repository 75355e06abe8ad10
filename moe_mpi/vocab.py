"""The LM head split by vocabulary rows (``--lm-head split``): each rank computes its share of the logits.

Replicated, the LM head (``[vocab, hidden]``) is read whole by every rank at
every step, as mlx-lm's tensor parallelism reads it too. In a model with few
active parameters per token it is a large part of what a step reads: on
Qwen3-30B-A3B (vocabulary 151936, hidden 2048) 0.31 G of the ~3 G weights a
token reads on one machine. Split, rank ``r`` keeps rows ``[start_r,
stop_r)`` of it (and reads only those from disk), computes those logits, and
one all-gather joins them: one collective per forward call, not per layer,
so the MoE layers keep their one all-reduce each. Every rank then holds the
same full logits and samples as before.

A row of the head is a whole dot product over the hidden dimension, so each
logit is the same sum as in the whole matrix, to float32 rounding (a BLAS
may block a narrower matrix differently); quantization groups run along the
hidden dimension, so any row cut keeps them whole.

The head is the linear layer whose output width is the vocabulary size,
found by shape, not by name (``lm_head``, ``output``, phixtral's
``lm_head.linear``). A model whose output projection is its embedding
(``tie_word_embeddings``: mlx-lm calls ``embed_tokens.as_linear``) keeps
the embedding whole, since the lookup needs every row, and splits only the
work: its ``as_linear`` multiplies by this rank's rows and gathers. That
saves reading, not memory.

In a prompt chunk whose logits nobody reads the head skips its work and its
all-gather (:mod:`moe_mpi.unread`), as MLX's laziness leaves out a
replicated head.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import with_mixin
from .slicing import Plan, apportion, keep_rows
from .unread import Skippable

__all__ = [
    "LM_HEAD_CHOICES", "VocabParallelEmbedding", "VocabParallelHead", "find_lm_head", "find_tied_embedding",
    "split_lm_head", "vocab_rows",
]

LM_HEAD_CHOICES = ("replicated", "split")


class VocabParallelHead(Skippable):
    """Mixin for the LM head's linear layer: this rank's rows of the logits, gathered from every rank."""

    skip_kind = "lm_head"
    collective = "all_gather"

    def __call__(self, x):
        comm, sizes = self.vocab_rows  # sizes: every rank's row count, in rank order
        if self.output_unread is not None:
            return _unread_logits(self, x, sum(sizes))
        part = super().__call__(x)  # [..., sizes[rank]]
        return comm.all_gather(part, sizes)  # [..., vocab]: the head's collective


class VocabParallelEmbedding(Skippable):
    """Mixin for a tied embedding: the lookup as before; as the LM head (``as_linear``), this rank's rows, gathered."""

    skip_kind = "lm_head"
    collective = "all_gather"

    def as_linear(self, x):
        comm, sizes, rows = self.vocab_rows
        if self.output_unread is not None:
            return _unread_logits(self, x, sum(sizes))
        # The embedding class's own as_linear, on a view of this rank's rows.
        part = super(VocabParallelEmbedding, self).as_linear.__func__(_Rows(self, rows), x)  # [..., sizes[rank]]
        return comm.all_gather(part, sizes)


def _unread_logits(head: Skippable, x: mx.array, vocab: int) -> mx.array:
    """What a head told its logits are unread returns: its fill, shaped as the logits, without work or gather."""
    return head.unread(mx.broadcast_to(mx.array(0, dtype=x.dtype), (*x.shape[:-1], vocab)))


class _Rows:
    """A module seen through rows ``[start, stop)`` of its arrays, cut when read (the loader replaces them)."""

    def __init__(self, module: nn.Module, rows: Tuple[int, int]):
        self._module, self._rows = module, slice(*rows)

    def _cut(self, value):
        return value[self._rows] if isinstance(value, mx.array) else value

    def __getitem__(self, key):
        return self._cut(self._module[key])

    def get(self, key, default=None):
        return self._cut(self._module.get(key, default))

    def __getattr__(self, key):
        return self._cut(getattr(self._module, key))


def find_tied_embedding(model: nn.Module) -> Optional[Tuple[str, nn.Module, int]]:
    """``(path, module, vocab)`` of the token embedding: the widest embedding outside the decoder layers
    (gemma's per-layer embeddings are narrower), or None if there is none or two are as wide."""
    found = [
        (_width(m), path, m) for path, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)) and ".layers." not in f".{path}"
    ]
    found.sort(key=lambda wpm: -wpm[0])
    if not found or (len(found) > 1 and found[1][0] == found[0][0]):
        return None
    _, path, m = found[0]
    return path, m, int(m.weight.shape[0])


def _width(embedding: nn.Module) -> int:
    """Values per row (a quantized embedding packs 32 // bits of them per stored word)."""
    packed = embedding.weight.shape[1]
    return packed * 32 // embedding.bits if isinstance(embedding, nn.QuantizedEmbedding) else packed


def find_lm_head(model: nn.Module) -> Optional[Tuple[str, nn.Module, int]]:
    """``(path, module, vocab)`` of the linear layer that makes the logits, or None if there is none.

    It is the linear layer outside the decoder layers whose output width is
    the embedding's row count (the vocabulary).

    Raises:
        ValueError: Several linear layers fit (which one makes the logits is
            then not known from the shapes).
    """
    vocabs = {m.weight.shape[0] for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))}
    found = [
        (path, m, int(m.weight.shape[0])) for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and m.weight.shape[0] in vocabs
        and ".layers." not in f".{path}"
    ]
    if len(found) > 1:
        raise ValueError(f"lm_head='split': {len(found)} linear layers have a vocabulary's outputs "
                         f"({', '.join(p for p, _, _ in found)}); which one makes the logits is not clear")
    return found[0] if found else None


def vocab_rows(vocab: int, rank: int, size: int, weights: Optional[Sequence[float]] = None) -> Tuple[int, int]:
    """Rank ``rank``'s rows ``[start, stop)`` of a ``vocab``-row head, in proportion to ``weights``."""
    return _bounds(_sizes(vocab, size, weights), rank)


def _sizes(vocab: int, size: int, weights: Optional[Sequence[float]]) -> Tuple[int, ...]:
    """Every rank's row count, in rank order."""
    return tuple(int(n) for n in apportion(vocab, weights if weights is not None else [1.0] * size))


def _bounds(sizes: Sequence[int], rank: int) -> Tuple[int, int]:
    start = int(sum(sizes[:rank]))
    return start, start + int(sizes[rank])


def split_lm_head(model: nn.Module, comm, model_type: str,
                  weights: Optional[Sequence[float]] = None) -> Tuple[Plan, str]:
    """Keeps this rank's rows of the LM head (lazily) and makes it gather the logits.

    With tied embeddings the embedding stays whole and only its ``as_linear``
    is split (:class:`VocabParallelEmbedding`).

    Returns:
        ``(plan, path)``: where the kept parameters come from (nothing for a
        tied embedding), and the head's path.

    Raises:
        ValueError: No LM head and no single embedding to be one, or more
            than one candidate.
    """
    found = find_lm_head(model)
    if found is None:
        tied = find_tied_embedding(model)
        if tied is None:
            raise ValueError(f"lm_head='split': model_type={model_type!r} has no linear layer or single embedding "
                             "that makes the logits; use lm_head='replicated'")
        path, embedding, vocab = tied
        sizes = _sizes(vocab, comm.size, weights)
        object.__setattr__(embedding, "vocab_rows", (comm, sizes, _bounds(sizes, comm.rank)))
        embedding.__class__ = with_mixin(VocabParallelEmbedding, type(embedding))
        return {}, path
    path, head, vocab = found
    sizes = _sizes(vocab, comm.size, weights)
    start, stop = _bounds(sizes, comm.rank)
    plan = keep_rows(path, head, np.arange(start, stop))  # weight, scales, biases, bias: one row per logit
    # A plain attribute: nn.Module would take a tuple for parameters.
    object.__setattr__(head, "vocab_rows", (comm, sizes))
    head.__class__ = with_mixin(VocabParallelHead, type(head))
    return plan, path
