"""What mlx-lm's ``BatchGenerator`` cannot do exactly for a model, and the way round.

**Caches without ``merge``.** ``BatchGenerator`` puts each sequence's cache
into the batch with the cache's ``merge`` (and later ``extract``,
``filter``, ``extend``). Some models' caches have none: in mlx-lm 0.32,
deepseek_v41's ``LayerCache`` and llama4's ``ChunkedKVCache``.
``BatchGenerator`` then raises "does not yet support batching with history"
at the first prompt, and ``mlx_lm.server`` serves such a model one request
at a time through a loop of its own. moe_mpi keeps its one loop
(``moe-mpi serve``'s control broadcast, cancellation and prompt cache;
``moe-mpi generate``'s batch mode) and runs ``BatchGenerator`` with batches
of one instead: every cache of a sequence is made a batch of one
(:func:`solo_caches`), whose ``merge`` takes that one cache as it is, and
the generator is given one sequence at a time (``completion_batch_size=1``).
The model then computes what mlx-lm's single-sequence ``generate_step``
computes. Such a cache that has dropped the front of its window (llama4's
chunked attention past a chunk) also stops saying it can be trimmed, so
the prompt cache never trims it past what it dropped.

**Prompts of different lengths prefilled together.** ``BatchGenerator``
pads the shorter prompts of a prefill batch and relies on each cache to
discount the padding. Attention caches do; the recurrent state of some
models' layers (in mlx-lm 0.32 jamba's and nemotron_h's Mamba layers,
bailing_moe_linear's linear attention, longcat_flash_ngram's n-gram
context) takes the padding in, and those prompts get other answers than
alone, in ``mlx_lm.server`` too. :func:`padded_prefill_is_exact` finds out
by trying it (two prompts of different lengths, together and alone), so no
list of models is kept; where it is not exact, prompts are prefilled one at
a time and still decoded together (a batch's decode steps feed no padding).
"""

from __future__ import annotations

import functools
from typing import Any, List, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

__all__ = ["PROBE_TEXT", "padded_prefill_is_exact", "solo_caches", "unbatchable_caches"]


def unbatchable_caches(model) -> List[str]:
    """The type names of ``model``'s caches that mlx-lm cannot merge into a batch.

    Empty when the model batches (``mlx_lm.server``'s rule: every cache of
    ``make_prompt_cache(model)`` has a ``merge``).
    """
    return sorted({type(c).__name__ for c in make_prompt_cache(model) if not hasattr(c, "merge")})


class _BatchOfOne:
    """The batch methods ``BatchGenerator`` calls on a cache, for a batch of one sequence."""

    def merge(self, caches):
        if len(caches) != 1:
            raise ValueError(f"{type(self).__name__} holds one sequence; cannot merge {len(caches)} into a batch")
        return caches[0]

    def extract(self, idx: int):
        if idx != 0:
            raise IndexError(f"a batch of one has no sequence {idx}")
        return self

    def filter(self, keep) -> None:
        if list(keep) != [0]:  # keeping none clears the batch's list, not the cache
            raise ValueError(f"a batch of one cannot keep sequences {list(keep)}")

    def extend(self, other):
        raise ValueError(f"{type(self).__name__} holds one sequence; cannot extend the batch")

    def prepare(self, **kwargs):
        # Padding is only ever asked for when prompts of different lengths share a batch.
        raise ValueError(f"{type(self).__name__} holds one sequence; nothing to pad")

    def finalize(self):
        raise ValueError(f"{type(self).__name__} holds one sequence; nothing to pad")

    def is_trimmable(self) -> bool:
        # A cache that has dropped tokens from the front of its window cannot
        # give them back; mlx-lm's ChunkedKVCache says it can, and a prompt
        # cache hit trimmed past its front answers wrongly.
        return super(type(self), self).is_trimmable() and getattr(self, "start_position", 0) == 0


@functools.lru_cache(maxsize=None)
def _one_of(cls: type) -> type:
    # A subclass, so that the model's own isinstance checks and methods see
    # the cache it made. The methods go into the subclass itself (a second
    # base would change the instance layout, and __class__ could not be set),
    # where they override a batchable cache's own.
    methods = {k: v for k, v in vars(_BatchOfOne).items() if callable(v)}
    return type(cls.__name__, (cls,), {**methods, "__slots__": (), "__module__": cls.__module__})


def solo_caches(model) -> List[Any]:
    """A fresh prompt cache of ``model`` (``make_prompt_cache``), each entry a batch of one.

    Give it to ``BatchGenerator.insert``'s ``caches`` and keep the generator
    at one sequence (``completion_batch_size=1``, ``prefill_batch_size=1``).
    Copies (``copy.deepcopy``, as mlx-lm's prompt cache makes them) stay
    batches of one.
    """
    caches = make_prompt_cache(model)
    for c in caches:
        c.__class__ = _one_of(type(c))
    return caches


#: Largest difference of a log-probability between a prompt prefilled with
#: padding and alone that still counts as the same answer, by the logits'
#: dtype. On the tiny models of tests/configs.py, batched rounding moved the
#: probe's log-probabilities by at most 3.4e-5 (float32 logits, float32 or
#: 4-bit weights) and 0 (bfloat16 logits, 4-bit weights), padding taken into
#: a recurrent state by 0.55 or more and 1.25 or more. 16-bit logits get ten
#: times float32's margin: one rounding step of a bfloat16 logit of 16 is
#: 0.125, and other kernels (Metal's, for other batch shapes) may round
#: another way (docs/serving.md).
PADDING_TOLERANCE = {"float32": 0.05, "16-bit": 0.5}

#: The probe's prompt lengths: one padded by 5 tokens to the other.
PROBE_LENGTHS = (3, 8)


def _first_logprobs(model, prompts: Sequence[Sequence[int]], together: int) -> List[mx.array]:
    """Log-probabilities of each prompt's first token, ``together`` prompts prefilled at a time."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=len(prompts), prefill_batch_size=together)
    try:
        uids = gen.insert([list(p) for p in prompts], [1] * len(prompts))
        first = {}
        while responses := gen.next_generated():
            for r in responses:
                first.setdefault(r.uid, r.logprobs)
    finally:
        gen.close()
    return [first[uid] for uid in uids]


def padded_prefill_is_exact(model, tokens: Sequence[int]) -> bool:
    """Whether ``model`` answers prompts prefilled together, padded, as it answers them alone.

    Runs the model (on a sharded model, every rank must call it alike): two
    prompts of :data:`PROBE_LENGTHS` tokens taken in turn from ``tokens``
    (any valid ids, e.g. an encoded sentence), prefilled together and then
    one at a time, compared by their first token's log-probabilities
    (:data:`PADDING_TOLERANCE`, by the logits' dtype). A model whose caches cannot be batched at
    all (:func:`unbatchable_caches`) is never padded: True.
    """
    if unbatchable_caches(model):
        return True
    if not tokens:
        raise ValueError("padded_prefill_is_exact needs at least one token id")
    ids = [int(t) for t in tokens]
    prompts = [[ids[(start + i) % len(ids)] for i in range(n)] for start, n in enumerate(PROBE_LENGTHS)]
    together = _first_logprobs(model, prompts, together=len(prompts))
    alone = _first_logprobs(model, prompts, together=1)
    tolerance = PADDING_TOLERANCE["float32" if alone[0].dtype == mx.float32 else "16-bit"]
    worst = max(float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()) for a, b in zip(together, alone))
    return worst <= tolerance


#: What :func:`padded_prefill_is_exact`'s callers encode for its token ids.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
