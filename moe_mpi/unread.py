"""Work nobody reads: the last layer of a prompt chunk, left out as mlx-lm's lazy graph leaves it out.

mlx-lm prefills a prompt in chunks and keeps only the KV caches of a chunk:
``PromptProcessingBatch.prompt`` calls the model and evaluates
``[c.state for c in cache]``, never the logits. MLX evaluates lazily, so in
a tensor-parallel or single-process model everything after the last cache
write is never computed: the last layer's MLP (and its all-reduces), the
final norm, the LM head.

moe_mpi's blocks cannot be pruned that way: an MoE block reads its routing
on the host and ends in an all-reduce that runs when called
(:class:`moe_mpi.shard.ExpertParallelBlock`), and so does a split attention
(:class:`moe_mpi.attention.HeadParallelAttention`). Without help, every
prompt chunk would compute the last MoE layer in full and send its
all-reduce, for an output that is dropped: one MoE layer in ``L`` of the
prefill work, one all-reduce in ``L`` of its messages.

So a module that ends in an all-reduce (:class:`Skippable`) can be told
that its output will not be read. It then returns a placeholder of NaNs
(lazily, at no cost) instead of computing and reducing: NaN, so that if a
caller ever did read it, the logits would be non-finite and
:mod:`moe_mpi.finite` would refuse them rather than let a wrong token out.
A split attention still runs its own ``__call__`` first, since that writes
its KV cache.

Which modules may skip is not assumed from the architecture.
:func:`find_unread_tail` takes the last MoE block and the last split
attention as candidates and, for each, runs the model on a short input twice
with fresh caches: as it is, and with the candidate returning a constant. A
candidate is kept only if every cache state is bit-for-bit the same, i.e.
its output reaches no cache. Every rank runs the same probe on the same
replicated data, and a candidate is kept only where it passed on every
rank (one ``allgather``), so every rank skips the same all-reduces.

:func:`skip_unread_prefill` gives an mlx-lm ``BatchGenerator`` the skip for
its prompt chunks (the serve engine, batch ``generate``); :func:`prefill_cache`
does mlx-lm's single-prompt prefill with it (``generate --prompt``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .experts import layer_order

__all__ = ["Skippable", "UnreadTail", "find_unread_tail", "prefill_cache", "skip_unread_prefill"]

#: Tokens of the probe's input.
PROBE_TOKENS = 3
#: What a candidate returns in the probe: finite, so that nothing downstream
#: (a router, the routing guard) sees a NaN; not a value a layer would give.
PROBE_FILL = 0.375


#: ``id(module) -> fill`` of the modules told their output is unread. A
#: context variable, so that it holds for one task only where two forward
#: passes take turns on one thread (:mod:`moe_mpi.overlap`).
_UNREAD: contextvars.ContextVar = contextvars.ContextVar("moe_mpi_unread", default={})


class Skippable:
    """Mixin base of a module that ends in an all-reduce and may be told its output is unread.

    While ``output_unread`` holds a number (set by :meth:`UnreadTail.active`),
    :meth:`unread` is what the module returns instead of its reduced output.
    """

    #: The kind of module (one candidate of each kind is probed).
    skip_kind = "module"
    #: The collective a skipped call leaves out (the split LM head's is an all-gather).
    collective = "all_sum"

    @property
    def output_unread(self) -> Optional[float]:
        """The fill to return instead of the output, or None to compute it."""
        return _UNREAD.get().get(id(self))

    def unread(self, like: mx.array) -> mx.array:
        """A lazy array of ``output_unread`` shaped as ``like``, counted as one skipped all-reduce."""
        self.__dict__["unread_calls"] = self.__dict__.get("unread_calls", 0) + 1
        return mx.full(like.shape, self.output_unread, like.dtype)


class UnreadTail:
    """The modules whose output a cache-only call leaves unread (see the module docstring).

    Attributes:
        modules: The :class:`Skippable` modules found safe to skip.
        rejected: Paths of the candidates whose output reaches a cache.
    """

    def __init__(self, modules: Sequence[nn.Module] = (), rejected: Sequence[str] = ()):
        self.modules = list(modules)
        self.rejected = list(rejected)

    @property
    def skipped(self) -> int:
        """All-reduces left out so far (one per skipped module call)."""
        return self.skipped_of("all_sum")

    def skipped_of(self, collective: str) -> int:
        """Collectives of kind ``collective`` left out so far (``"all_gather"``: the split LM head's)."""
        return sum(m.__dict__.get("unread_calls", 0) for m in self.modules if type(m).collective == collective)

    @contextlib.contextmanager
    def active(self, fill: float = math.nan) -> Iterator[None]:
        """While open (in this task: a context variable), the modules return ``fill`` instead of computing their output."""
        token = _UNREAD.set({**_UNREAD.get(), **{id(m): fill for m in self.modules}})
        try:
            yield
        finally:
            _UNREAD.reset(token)


def _candidates(model: nn.Module) -> List[tuple]:
    """``(path, module)`` of the last skippable module of each kind (MoE block, attention), in model order."""
    last = {}
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, Skippable)]
    for path, module in sorted(found, key=lambda pm: layer_order(pm[0])):
        last[type(module).skip_kind] = (path, module)
    return sorted(last.values(), key=lambda pm: layer_order(pm[0]))


def _cache_states(model: nn.Module, module: Optional[nn.Module]) -> List[np.ndarray]:
    """Every cache state after a fresh prefill of the probe input, ``module`` (if any) returning a constant."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tail = UnreadTail([module] if module is not None else [])
    counted = module.__dict__.get("unread_calls", 0) if module is not None else 0
    try:
        with tail.active(PROBE_FILL):
            model(mx.arange(PROBE_TOKENS, dtype=mx.int32)[None], cache=cache)
    finally:
        if module is not None:  # the probe's own skips are not counted
            module.__dict__["unread_calls"] = counted
    states = [v for c in cache for _, v in tree_flatten(c.state) if isinstance(v, mx.array)]
    mx.eval(states)
    return [np.array(s) for s in states]


def find_unread_tail(model: nn.Module, comm=None) -> UnreadTail:
    """The modules a cache-only call may skip, each checked by a probe (every rank, together).

    Runs ``1 + candidates`` forward passes of :data:`PROBE_TOKENS` tokens, with
    their all-reduces, so every rank must call it at the same point.

    Args:
        model: A sharded model.
        comm: The job's :class:`moe_mpi.Communicator`. A candidate is kept
            only if its probe passed on every rank (one ``allgather``): a
            rank whose kernels do not repeat bit for bit would otherwise
            skip an all-reduce its peers send, and the job would hang.
    """
    candidates = _candidates(model)
    if not candidates:
        return UnreadTail()
    reference = _cache_states(model, None)
    passed, why = [], []
    for path, module in candidates:
        try:
            states = _cache_states(model, module)
        except (ValueError, TypeError) as e:  # the model did not take a plain array there
            passed.append(False)
            why.append(f"{path} ({type(e).__name__}: {e})")
            continue
        passed.append(len(states) == len(reference) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(states, reference)
        ))
        why.append(path)
    if comm is not None and comm.size > 1:
        passed = [all(ranks) for ranks in zip(*comm.allgather(passed))]
    keep = [module for (_, module), ok in zip(candidates, passed) if ok]
    return UnreadTail(keep, [w for w, ok in zip(why, passed) if not ok])


class UnreadPrompts:
    """Mixin for mlx-lm's ``PromptProcessingBatch``: its ``prompt`` keeps only the caches.

    ``prompt`` calls the model and evaluates the caches only; the tail's
    modules skip their work for it. The class carries the tail, so that the
    batch's copies (``split``) keep it.
    """

    unread_tail: UnreadTail

    def prompt(self, tokens):
        with self.unread_tail.active():
            return super().prompt(tokens)


def skip_unread_prefill(batch, tail: Optional[UnreadTail]) -> bool:
    """Lets an mlx-lm ``BatchGenerator``'s prompt chunks skip ``tail``'s modules.

    mlx-lm keeps one prompt batch per generator (``_prompt_batch``; new
    prompts are merged into it), so its class is swapped once. Returns
    whether the skip is in place: False for an empty tail, or a generator
    without that attribute (another mlx-lm version), which then runs as it is.
    """
    prompts = getattr(batch, "_prompt_batch", None)
    if tail is None or not tail.modules or prompts is None or not hasattr(prompts, "prompt"):
        return False
    base = type(prompts)
    prompts.__class__ = type(base.__name__, (UnreadPrompts, base), {"unread_tail": tail})
    return True


def prefill_cache(model: nn.Module, prompt: Sequence[int], tail: Optional[UnreadTail], step_size: int = 2048) -> list:
    """A fresh prompt cache holding ``prompt[:-1]``, prefilled in chunks as mlx-lm's ``generate_step`` does.

    ``tail``'s modules skip their work for each chunk. Hand the cache and
    ``prompt[-1:]`` to ``stream_generate``: its first step is the last
    prompt token, whose logits are read.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens = mx.array(list(prompt[:-1]), dtype=mx.int32)
    with tail.active() if tail is not None else contextlib.nullcontext():
        for start in range(0, tokens.size, step_size):
            model(tokens[start : start + step_size][None], cache=cache)
            mx.eval([c.state for c in cache])
    return cache
