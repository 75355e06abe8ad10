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

A row of the head is a whole dot product over the hidden dimension, so a
row's logit is computed exactly as in the whole matrix (quantization groups
run along the hidden dimension, so any row cut keeps them whole).

The head is the linear layer whose output width is the vocabulary size,
found by shape, not by name (``lm_head``, ``output``, phixtral's
``lm_head.linear``). A model whose output projection is its embedding
(``tie_word_embeddings``) has none and cannot be split: the embedding is
needed whole for the lookup.

In a prompt chunk whose logits nobody reads the head skips its work and its
all-gather (:mod:`moe_mpi.unread`), as MLX's laziness leaves out a
replicated head.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .experts import with_mixin
from .slicing import Plan, Take, apportion, take
from .unread import Skippable

__all__ = ["LM_HEAD_CHOICES", "VocabParallelHead", "find_lm_head", "split_lm_head", "vocab_rows"]

LM_HEAD_CHOICES = ("replicated", "split")


class VocabParallelHead(Skippable):
    """Mixin for the LM head's linear layer: this rank's rows of the logits, gathered from every rank."""

    skip_kind = "lm_head"

    def __call__(self, x):
        rows = self.vocab_rows  # (comm, sizes): every rank's row count, in rank order
        comm, sizes = rows
        if self.output_unread is not None:
            like = mx.broadcast_to(mx.array(0, dtype=x.dtype), (*x.shape[:-1], sum(sizes)))
            return self.unread(like)
        part = super().__call__(x)  # [..., sizes[rank]]
        return comm.all_gather(part, sizes)  # [..., vocab]: the head's collective


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
    sizes = apportion(vocab, weights if weights is not None else [1.0] * size)
    start = int(sum(sizes[:rank]))
    return start, start + int(sizes[rank])


def split_lm_head(model: nn.Module, comm, model_type: str,
                  weights: Optional[Sequence[float]] = None) -> Tuple[Plan, str]:
    """Keeps this rank's rows of the LM head (lazily) and makes it gather the logits.

    Returns:
        ``(plan, path)``: where the kept parameters come from, and the head's path.

    Raises:
        ValueError: The model has no separate LM head (tied embeddings) or
            more than one candidate.
    """
    found = find_lm_head(model)
    if found is None:
        raise ValueError(
            f"lm_head='split': model_type={model_type!r} has no LM head apart from its embedding (tied: "
            "every rank needs the embedding whole for the lookup); use lm_head='replicated'"
        )
    path, head, vocab = found
    sizes = apportion(vocab, weights if weights is not None else [1.0] * comm.size)
    start, stop = vocab_rows(vocab, comm.rank, comm.size, weights)
    index = np.arange(start, stop)
    plan: Plan = {}
    kept = []
    for leaf, a in tree_flatten(head.parameters()):  # weight, scales, biases, bias: one row per logit
        plan[f"{path}.{leaf}"] = Take(f"{path}.{leaf}", 0, index)
        kept.append((leaf, take(a, 0, index)))
    head.update(tree_unflatten(kept))
    # A plain attribute: nn.Module would take a tuple for parameters.
    object.__setattr__(head, "vocab_rows", (comm, tuple(int(s) for s in sizes)))
    head.__class__ = with_mixin(VocabParallelHead, type(head))
    return plan, path
